"""ONNX Runtime CPU throughput of ToMe exports vs the unmerged export of the same weights.

For each model: export the unmerged model and one ToMe model per schedule (same random weights), then
time them interleaved at each batch size and print the measured speedup next to the theoretical FLOP
ratio, plus the share of ToMe model time spent in matching + merging (ONNX Runtime profiler).

    python benchmarks/ort_throughput.py                       # ViT-S/16 and ViT-B/16 at 224, batch 1 and 8
    python benchmarks/ort_throughput.py --models vit_small_patch16_224 --batches 8 --schedules r=16 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tome_deploy.models.loading.dispatch import load_model
from tome_deploy.models.loading.fingerprint import weights_fingerprint
from tome_deploy.models.patch import apply_tome
from tome_deploy.onnx_export.export import export_onnx
from tome_deploy.onnx_export.metadata import build_metadata
from tome_deploy.runtime.profiling import profile_merge_share
from tome_deploy.runtime.throughput import time_interleaved

SCHEDULES = {"r=8": 8, "r=16": 16, "r=(16,-1)": (16, -1.0)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    parser.add_argument("--merge", default="scatter", choices=("scatter", "matmul"))
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds per batch size")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser.parse_args()


def export_variants(arch: str, schedules: list[str], merge: str, folder: Path) -> tuple[dict, dict]:
    loaded = load_model(arch)
    fingerprint = weights_fingerprint(loaded.model)
    paths, metas = {}, {}
    for label, spec in [("unmerged", 0)] + [(name, SCHEDULES[name]) for name in schedules]:
        tome, schedule = apply_tome(loaded.model, spec, merge)
        meta = build_metadata(tome, schedule, spec, arch=arch, weights=loaded.weights, weights_sha256=fingerprint,
                              merge=merge, opset=18, batch="dynamic", example_batch=2)
        start = time.perf_counter()
        paths[label] = export_onnx(tome, meta, folder / f"{arch}_{label}.onnx").path
        metas[label] = meta
        print(f"  exported {arch} {label} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return paths, metas


def main() -> None:
    args = parse_args()
    schedules = args.schedules
    rows = []
    header = f"{'model':<24} {'schedule':<10} {'batch':>5} {'unmerged img/s':>15} {'ToMe img/s':>11} {'measured':>9} {'FLOPs':>7} {'meas/FLOPs':>10} {'merge share':>11}"
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            paths, metas = export_variants(arch, schedules, args.merge, Path(tmp))
            input_size = metas["unmerged"].input_size
            for batch in [int(b) for b in args.batches.split(",")]:
                timings = time_interleaved(paths, "pixel_values", input_size, batch, rounds=args.rounds, threads=args.threads)
                feed = np.random.default_rng(1).standard_normal((batch, *input_size)).astype(np.float32)
                for label in schedules:
                    share = profile_merge_share(paths[label], "pixel_values", feed, runs=3, threads=args.threads)
                    measured = timings["unmerged"].median_s / timings[label].median_s
                    flops = metas[label].theoretical_speedup
                    rows.append({
                        "model": arch, "schedule": label, "batch": batch,
                        "unmerged_img_s": timings["unmerged"].images_per_s, "tome_img_s": timings[label].images_per_s,
                        "measured_speedup": measured, "flops_speedup": flops, "ratio_to_flops": measured / flops,
                        "merge_share": share.merge_share,
                    })
                    print(f"  {arch} {label} batch {batch}: {measured:.2f}x (FLOPs {flops:.2f}x)", file=sys.stderr, flush=True)
    print(header)
    for row in rows:
        print(f"{row['model']:<24} {row['schedule']:<10} {row['batch']:>5} {row['unmerged_img_s']:>15.1f} {row['tome_img_s']:>11.1f} "
              f"{row['measured_speedup']:>8.2f}x {row['flops_speedup']:>6.2f}x {row['ratio_to_flops']:>9.0%} {row['merge_share']:>10.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
