"""ONNX Runtime CPU throughput of ToMe exports vs the unmerged export of the same weights.

For each model: export the unmerged model and one ToMe model per schedule (same random weights), then
time them interleaved at each batch size and print the measured speedup next to the theoretical FLOP
ratio, plus the share of ToMe model time spent in matching + merging (ONNX Runtime profiler).

    python benchmarks/ort_throughput.py                       # ViT-S/16 and ViT-B/16 at 224, batch 1 and 8
    python benchmarks/ort_throughput.py --models vit_small_patch16_224 --batches 8 --schedules r=16 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import BASELINE, SCHEDULES, export_variants, markdown_table, whole_numbers, write_json

from tome_deploy.runtime.profiling import profile_merge_share
from tome_deploy.runtime.throughput import time_interleaved


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


def main() -> None:
    args = parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.models.split(","):
            outcomes = export_variants(arch, {name: SCHEDULES[name] for name in args.schedules}, Path(tmp), merge=args.merge)
            paths = {label: outcome.export.path for label, outcome in outcomes.items()}
            meta = outcomes[BASELINE].export.metadata
            for batch in whole_numbers(args.batches):
                timings = time_interleaved(paths, meta.input_name, meta.input_size, batch, rounds=args.rounds, threads=args.threads)
                feed = np.random.default_rng(1).standard_normal((batch, *meta.input_size)).astype(np.float32)
                for label in args.schedules:
                    share = profile_merge_share(paths[label], meta.input_name, feed, runs=3, threads=args.threads)
                    measured = timings[BASELINE].median_s / timings[label].median_s
                    flops = outcomes[label].export.metadata.theoretical_speedup
                    rows.append({
                        "model": arch, "schedule": label, "batch": batch,
                        "unmerged_img_s": timings[BASELINE].images_per_s, "tome_img_s": timings[label].images_per_s,
                        "measured_speedup": measured, "flops_speedup": flops, "ratio_to_flops": measured / flops,
                        "merge_share": share.merge_share,
                    })
                    print(f"  {arch} {label} batch {batch}: {measured:.2f}x (FLOPs {flops:.2f}x)", file=sys.stderr, flush=True)
    header = ["model", "schedule", "batch", "unmerged img/s", "ToMe img/s", "measured", "FLOPs ratio", "measured / FLOPs", "merge share"]
    print(markdown_table(header, [
        [r["model"], r["schedule"], r["batch"], f"{r['unmerged_img_s']:.1f}", f"{r['tome_img_s']:.1f}", f"{r['measured_speedup']:.2f}x",
         f"{r['flops_speedup']:.2f}x", f"{r['ratio_to_flops']:.0%}", f"{r['merge_share']:.1%}"] for r in rows]))
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
