"""CPU throughput of ToMe exports vs a plain export of the same weights, in ONNX Runtime and OpenVINO.

The baseline is what a user would have without tome-deploy: `torch.onnx.export` (dynamo, opset 18,
dynamic batch) of the timm model itself. For each model: export the plain model and one ToMe model per
(schedule, merge formulation), same random weights; time them interleaved in each runtime at each batch
size; print the measured speedup next to the FLOP ratio, the ratio to it, the share of ToMe time spent in
matching + merging (each row's runtime's own profiler: ONNX Runtime kernel events, OpenVINO per-layer
counters; `TokenMerger` scopes) and the ONNX Runtime fusions that fired in the plain and in the ToMe graph
(fused op types in the graph ORT runs, ORT_ENABLE_ALL).

    python benchmarks/ort_throughput.py                 # ViT-S/16 and ViT-B/16 r=16, batch 1 and 8, both runtimes
    python benchmarks/ort_throughput.py --models vit_base_patch16_224 --batches 32          # scaling: batch 32
    python benchmarks/ort_throughput.py --models vit_large_patch16_384 --schedules 23 --batches 1   # 577 tokens
    python benchmarks/ort_throughput.py --models vit_small_patch16_224 --batches 8 --sweep 0,4,8,12,16,20 \\
        --plot docs/speedup_vs_flops.png              # measured speedup vs FLOP ratio over r
    python benchmarks/ort_throughput.py --models families --merges scatter --runtimes onnxruntime   # one ViT-S-sized model per family
    python benchmarks/ort_throughput.py --models torchvision:vit_l_16 --img-size 512 --schedules 40 --batches 1
    python benchmarks/ort_throughput.py --models hf-videomae-base --schedules 120 --merges scatter --batches 1
    python benchmarks/ort_throughput.py --models test_vit --batches 1 --rounds 2          # smoke run (~1 min)

--models takes timm names, model sources (`open_clip:ViT-S-16`, a `save_pretrained` folder), `hf-vit-small`
(a random transformers ViTForImageClassification of ViT-S/16 size, written to a temporary folder) and
`families` (one model of each family: timm ViT, timm Eva, transformers, OpenCLIP); `hf-videomae-base`
(VideoMAE-B, 16 frames of 224 px, 1568 tokens) and `hf-ast` (AST at 1024x128, strides 10, 1214 tokens) are
random transformers video / audio models written the same way. --img-size sets the resolution of image
models (`--models torchvision:vit_l_16 --img-size 512`: 1025 tokens). Every model is fed inputs of its
export's input spec (name and shape: a clip for video, a spectrogram for audio).

Add --profile to print, per runtime, the time per op type plain vs ToMe and the matching + merging time
per op type, for every batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import SCHEDULES, export_variants

from tome_deploy.runtime.factory import CPU_RUNTIMES, RUNTIME_LABELS
from tome_deploy.runtime.profiling import (
    Profile,
    fusions_fired,
    profile_side_by_side,
)
from tome_deploy.runtime.throughput import time_interleaved

# One model per family, all ViT-S sized (width 384, 6 heads, 12 blocks) at 224: random weights.
FAMILY_MODELS = ["vit_small_patch16_224", "eva02_small_patch14_224", "hf-vit-small", "open_clip:ViT-S-16"]


def hf_vit_small():
    """A random transformers ViT-S/16 (224, 1000 classes)."""
    import transformers

    config = transformers.ViTConfig(hidden_size=384, num_attention_heads=6, intermediate_size=1536, num_labels=1000)
    return transformers.ViTForImageClassification(config)


def hf_videomae_base():
    """A random transformers VideoMAE-B: 16 frames of 224 px, tubelets of 2 frames x 16 px -> 1568 tokens."""
    import transformers

    return transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(num_labels=400))


def hf_ast():
    """A random transformers AST at its defaults: 1024 frames x 128 mel bins, 16 px patches, strides 10 ->
    1212 patches + 2 prefix tokens."""
    import transformers

    return transformers.ASTForAudioClassification(transformers.ASTConfig(num_labels=527))


# --models labels that stand for a random transformers model written to a save_pretrained folder, as a
# user would have it, in a temporary folder.
HF_FOLDERS = {"hf-vit-small": hf_vit_small, "hf-videomae-base": hf_videomae_base, "hf-ast": hf_ast}


def write_hf_folder(label: str, folder: Path) -> Path:
    """A save_pretrained folder of the random model HF_FOLDERS names by `label`."""
    path = folder / label
    HF_FOLDERS[label]().save_pretrained(path)
    return path


def model_sources(text: str, folder: Path) -> dict[str, str]:
    """--models -> {label: what export_model loads}."""
    names = [name for item in text.split(",") for name in (FAMILY_MODELS if item == "families" else [item])]
    return {name: str(write_hf_folder(name, folder)) if name in HF_FOLDERS else name for name in names}


def parse_schedule(text: str):
    """'16' -> 16, '16,-1' -> (16, -1.0), or a name of SCHEDULES."""
    if text in SCHEDULES:
        return SCHEDULES[text]
    parts = text.strip("r=()").split(",")
    return int(parts[0]) if len(parts) == 1 else (int(parts[0]), float(parts[1]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument(
        "--schedules", nargs="+", default=["16"], help="r values, '16,-1' ramps, or r=8 / r=16 / r=(16,-1)"
    )
    parser.add_argument("--merges", default="scatter,matmul", help="merge formulations (scatter, matmul)")
    parser.add_argument("--runtimes", default=",".join(CPU_RUNTIMES), help="onnxruntime, openvino")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per batch size")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution of image models (default: theirs)")
    parser.add_argument(
        "--sweep", metavar="R0,R1,...", help="instead of --schedules: every r listed, first --merges only"
    )
    parser.add_argument("--plot", metavar="PNG", help="with --sweep: plot measured speedup vs FLOP ratio")
    parser.add_argument("--profile", action="store_true", help="print time per op type, plain vs ToMe, per runtime")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser.parse_args()


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def schedule_label(spec) -> str:
    return spec if isinstance(spec, str) else f"r={spec}"


def fusion_text(found: dict[str, int]) -> str:
    return " ".join(f"{op}:{n}" for op, n in sorted(found.items())) or "-"


def measure_model(
    arch: str,
    source: str,
    schedules: list,
    merges: list[str],
    runtimes: list[str],
    batches: list[int],
    args,
    folder: Path,
) -> list[dict]:
    rows = []
    plain_paths = None
    for merge in merges:
        (folder / merge).mkdir(exist_ok=True)
        outcomes = export_variants(
            source,
            {schedule_label(s): SCHEDULES.get(s, s) for s in schedules},
            folder / merge,
            plain=plain_paths is None,
            merge=merge,
            img_size=args.img_size,
        )
        paths = {label: outcome.export.path for label, outcome in outcomes.items()}
        metas = {label: outcome.export.metadata for label, outcome in outcomes.items()}
        if plain_paths is None:
            plain_paths = paths["unmerged"]
        paths["unmerged"] = plain_paths  # one baseline for every formulation
        labels = [label for label in paths if label != "unmerged"]
        fusions = {label: fusions_fired(path) for label, path in paths.items()}
        spec = metas["unmerged"].input
        for batch in batches:
            feed = np.random.default_rng(1).standard_normal((batch, *spec.shape)).astype(np.float32)
            for runtime in runtimes:
                # Kernel / layer time of every node (the runtime's profiler, models interleaved): the speedup the
                # kernels alone give, next to the wall clock's, and the matching + merging share.
                profiles = profile_side_by_side(runtime, paths, spec.name, feed, runs=3, threads=args.threads)
                kernels = {label: profile.share for label, profile in profiles.items()}
                if args.profile:
                    print_profile(runtime, arch, merge, batch, profiles, labels[-1])
                timings = time_interleaved(
                    paths, spec.name, spec.shape, batch, rounds=args.rounds, threads=args.threads, runtime=runtime
                )
                for label in labels:
                    measured = timings["unmerged"].median_s / timings[label].median_s
                    flops = metas[label].theoretical_speedup
                    rows.append(
                        {
                            "model": arch,
                            "tokens": metas[label].tokens_per_layer[0],
                            "input": "x".join(str(n) for n in spec.shape),
                            "schedule": label,
                            "merge": merge,
                            "runtime": runtime,
                            "batch": batch,
                            "plain_img_s": timings["unmerged"].images_per_s,
                            "tome_img_s": timings[label].images_per_s,
                            "measured_speedup": measured,
                            "flops_speedup": flops,
                            "ratio_to_flops": measured / flops,
                            "merge_share": kernels[label].merge_share,
                            "kernel_speedup": kernels["unmerged"].total_us / kernels[label].total_us,
                            "ort_fusions_plain": fusion_text(fusions["unmerged"]),
                            "ort_fusions_tome": fusion_text(fusions[label]),
                        }
                    )
                    say(f"  {arch} {label} {merge} {runtime} batch {batch}: {measured:.2f}x (FLOPs {flops:.2f}x)")
    return rows


def print_profile(runtime: str, arch: str, merge: str, batch: int, profiles: dict[str, Profile], label: str) -> None:
    plain, tome = profiles["unmerged"].op_types(), profiles[label].op_types()
    unit = "OpenVINO layer time (per-layer counters)" if runtime == "openvino" else "ONNX Runtime kernel time"
    print(f"\n{unit} per pass by op type, {arch} batch {batch}, plain vs ToMe {label} ({merge}), microseconds")
    print(f"{'op type':<28} {'plain':>10} {'ToMe':>10}")
    for op in sorted(set(plain) | set(tome), key=lambda o: -(tome.get(o, (0, 0))[1] + plain.get(o, (0, 0))[1]))[:18]:
        print(f"{op:<28} {plain.get(op, (0, 0))[1]:>10.0f} {tome.get(op, (0, 0))[1]:>10.0f}")
    print(f"{'total':<28} {profiles['unmerged'].share.total_us:>10.0f} {profiles[label].share.total_us:>10.0f}\n")
    print(
        f"matching + merging {'layers' if runtime == 'openvino' else 'nodes'} by op type, ToMe {label} ({merge}), all blocks"
    )
    print(f"{'op type':<28} {'count':>6} {'us/pass':>8} {'us each':>8}")
    for op, (count, us) in profiles[label].op_types(merge_only=True).items():
        print(f"{op:<28} {count:>6} {us:>8.0f} {us / count:>8.1f}")
    print()


def print_rows(rows: list[dict]) -> None:
    print(
        f"{'model':<22} {'tokens':>6} {'schedule':<10} {'merge':<8} {'runtime':<12} {'batch':>5} {'plain img/s':>11} "
        f"{'ToMe img/s':>10} {'measured':>8} {'FLOPs':>6} {'meas/FLOPs':>10} {'kernels':>7} {'merge share':>11}  ORT fusions (plain | ToMe)"
    )
    for row in rows:
        print(
            f"{row['model']:<22} {row['tokens']:>6} {row['schedule']:<10} {row['merge']:<8} {RUNTIME_LABELS[row['runtime']]:<12} "
            f"{row['batch']:>5} {row['plain_img_s']:>11.1f} {row['tome_img_s']:>10.1f} {row['measured_speedup']:>7.2f}x "
            f"{row['flops_speedup']:>5.2f}x {row['ratio_to_flops']:>9.0%} {row['kernel_speedup']:>6.2f}x {row['merge_share']:>10.1%}  "
            f"{row['ort_fusions_plain']} | {row['ort_fusions_tome']}"
        )


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5.5, 4.2))
    for runtime, batch in sorted({(r["runtime"], r["batch"]) for r in rows}):
        points = sorted(
            (r["flops_speedup"], r["measured_speedup"]) for r in rows if (r["runtime"], r["batch"]) == (runtime, batch)
        )
        axis.plot(*zip(*points), marker="o", label=f"{RUNTIME_LABELS[runtime]}, batch {batch}")
    top = max(max(r["flops_speedup"], r["measured_speedup"]) for r in rows)
    axis.plot([1, top], [1, top], color="grey", linestyle="--", label="measured = FLOP ratio")
    axis.set_xlabel("FLOP ratio (theoretical speedup)")
    axis.set_ylabel("measured speedup vs plain export")
    axis.set_title(f"{rows[0]['model']}, ToMe r sweep ({rows[0]['merge']})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    say(f"wrote {path}")


def main() -> None:
    args = parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    runtimes = [r for r in args.runtimes.split(",") if r]
    merges = [m for m in args.merges.split(",") if m]
    schedules = (
        [int(r) for r in args.sweep.split(",") if int(r) > 0]
        if args.sweep
        else [parse_schedule(s) for s in args.schedules]
    )
    if args.sweep:
        merges = merges[:1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch, source in model_sources(args.models, Path(tmp)).items():
            label = arch if args.img_size is None else f"{arch}@{args.img_size}"
            rows += measure_model(label, source, schedules, merges, runtimes, batches, args, Path(tmp))
    print_rows(rows)
    print(
        "\nkernels: the speedup in the row's runtime's profiler time alone (ONNX Runtime kernel events, OpenVINO "
        "per-layer counters; plain / ToMe, every node); what the wall clock loses beyond it is per-node executor overhead"
    )
    print(
        "merge share: that profiler's time in the TokenMerger nodes (the keys' mean over heads, matching, merging) "
        "/ ToMe total; matching is the [B, N/2, N/2] score matmul plus, in TensorRT exports, the counting rank's "
        "(N/2)^2 comparisons per layer"
    )
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
