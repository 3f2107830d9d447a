"""TensorRT engine throughput: ToMe vs the unmerged model of the same weights, side by side in one run.

Needs a CUDA GPU and full TensorRT or TensorRT-RTX. For each model: export r=0 and the ToMe schedule
(`--target tensorrt`, one-hot merge), build both engines with one batch profile, time them interleaved
at each batch size on device buffers (runtime/throughput.py, CUDA-synchronised, no host copies), and report the share of ToMe engine
time in layers built only from matching/merging nodes (TensorRT's per-layer profiler; layers that
TensorRT fused with other nodes count as "other", so the share is a lower bound).

    python benchmarks/trt_throughput.py                                   # ViT-S/16 and ViT-B/16, r=16, fp16
    python benchmarks/trt_throughput.py --models vit_base_patch16_224 --batches 1,8,64 --precision fp32
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

from common import BASELINE, export_variants, markdown_table, whole_numbers

from tome_deploy.runtime.factory import open_runner
from tome_deploy.runtime.profiling import merger_node_names
from tome_deploy.runtime.tensorrt import TensorRTRunner
from tome_deploy.runtime.tensorrt_backend import local_compute_capability
from tome_deploy.runtime.throughput import time_side_by_side
from tome_deploy.tensorrt.build import BuildOptions, build_engine


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16"))
    parser.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "tensorrt-rtx"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=50, help="forward passes per timing round")
    return parser.parse_args()


def bind(runner: TensorRTRunner, batch: int) -> list:
    """Random pixels of `batch` on the GPU, bound with their output buffers; keep the list alive while timing."""
    import torch

    pixels = torch.randn(batch, *runner.sidecar.input_shape, device="cuda")
    return [pixels, *runner.bind(pixels).values()]


def seconds_per_pass(engines: dict[str, TensorRTRunner], batch: int, rounds: int, iterations: int) -> dict[str, float]:
    """Median seconds per forward pass of each active engine at `batch`, interleaved round by round."""
    import torch

    buffers = [bind(runner, batch) for runner in engines.values()]  # kept alive while the engines use their addresses
    seconds = time_side_by_side(
        {label: runner.enqueue for label, runner in engines.items()},
        rounds=rounds,
        iterations=iterations,
        sync=torch.cuda.synchronize,
    )
    del buffers
    return seconds


def merge_share(runner: TensorRTRunner, onnx_path: Path, batch: int) -> float:
    """Share of layer time in layers whose every source node is a matching/merging node."""
    merger_nodes = merger_node_names(onnx_path)
    times = {"merge": 0.0, "other": 0.0}
    trt = runner.trt

    class LayerTimes(trt.IProfiler):
        def __init__(self):
            trt.IProfiler.__init__(self)

        def report_layer_time(self, layer_name, ms):
            parts = [p.strip() for p in layer_name.replace("+", ",").split(",") if p.strip()]
            times["merge" if parts and all(p in merger_nodes for p in parts) else "other"] += ms

    import torch

    buffers = bind(runner, batch)
    runner.context.profiler = LayerTimes()
    for _ in range(3):
        runner.enqueue()
    torch.cuda.synchronize()
    del buffers
    total = times["merge"] + times["other"]
    return times["merge"] / total if total else float("nan")


def main() -> int:
    args = parse_args()
    if local_compute_capability() is None:
        print("error: no CUDA GPU is visible; TensorRT engines can only be timed on a GPU", file=sys.stderr)
        return 2
    batches = whole_numbers(args.batches)
    options = BuildOptions(backend=args.backend, min_batch=1, opt_batch=max(batches), max_batch=max(batches))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.models.split(","):
            outcomes = export_variants(
                arch, {"tome": args.r}, Path(folder), target="tensorrt", precision=args.precision
            )
            onnx_files = {label: outcome.export.path for label, outcome in outcomes.items()}
            flops = outcomes["tome"].export.metadata.theoretical_speedup
            with contextlib.ExitStack() as active:
                engines = {
                    label: active.enter_context(
                        open_runner(build_engine(path, path.with_suffix(".plan"), options).plan)
                    )
                    for label, path in onnx_files.items()
                }
                for batch in batches:
                    seconds = seconds_per_pass(engines, batch, args.rounds, args.iterations)
                    base, tome = seconds[BASELINE], seconds["tome"]
                    rows.append([arch, batch, batch / base, batch / tome, base / tome, flops, None])
                    print(f"  {arch} batch {batch}: {base / tome:.2f}x", file=sys.stderr, flush=True)
                for row in rows[-len(batches) :]:  # profiled last: an attached profiler slows the engine down
                    row[-1] = merge_share(engines["tome"], onnx_files["tome"], row[1])
    backend = engines["tome"].sidecar
    print(
        f"{backend.backend} {backend.backend_version}, {args.precision}, r={args.r}, GPU compute capability {local_compute_capability()}"
    )
    header = [
        "model",
        "batch",
        "unmerged img/s",
        "ToMe img/s",
        "measured",
        "FLOPs ratio",
        "measured / FLOPs",
        "merge share",
    ]
    print(
        markdown_table(
            header,
            [
                [
                    arch,
                    batch,
                    f"{base_ips:.0f}",
                    f"{tome_ips:.0f}",
                    f"{ratio:.2f}x",
                    f"{flops:.2f}x",
                    f"{ratio / flops:.0%}",
                    f"{share:.1%}",
                ]
                for arch, batch, base_ips, tome_ips, ratio, flops, share in rows
            ],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
