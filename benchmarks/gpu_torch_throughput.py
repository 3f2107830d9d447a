"""PyTorch on a CUDA GPU: the fixed-shape ToMe model vs the unmerged model, eager and torch.compile.

Same random weights for both; each round runs every variant --iterations times, in turn (runtime/throughput.py,
CUDA-synchronised), medians of the rounds. ToMe's schedule is fixed at patch time, so torch.compile sees static shapes and compiles once
per batch size. Called by benchmarks/gpu_check.sh; usable alone:

    python benchmarks/gpu_torch_throughput.py --models vit_base_patch16_224 --batches 1,8,64 --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from tome_deploy.models.loading.dispatch import load_model
from tome_deploy.models.patch import apply_tome
from tome_deploy.runtime.throughput import time_side_by_side


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument("--merge", default="scatter", choices=("scatter", "matmul", "plugin"))
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=20, help="forward passes per round")
    parser.add_argument("--no-compile", action="store_true", help="eager only")
    parser.add_argument("--json", metavar="PATH")
    return parser.parse_args()


def time_variants(variants: dict, pixels: torch.Tensor, rounds: int, iterations: int) -> dict[str, float]:
    """Median seconds per forward pass for each callable, interleaved (runtime/throughput.py, CUDA-synchronised);
    the first round warms up and compiles."""
    with torch.inference_mode():
        return time_side_by_side(
            {name: functools.partial(fn, pixels) for name, fn in variants.items()},
            rounds=rounds,
            iterations=iterations,
            sync=torch.cuda.synchronize,
        )


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device; this benchmark runs on a GPU machine (benchmarks/gpu_check.sh)")
    dtype = getattr(torch, args.dtype)
    rows = []
    for arch in args.models.split(","):
        model = load_model(arch).model.eval()
        tome, _ = apply_tome(model, args.r, args.merge)
        model, tome = model.cuda().to(dtype), tome.cuda().to(dtype)
        for batch in [int(b) for b in args.batches.split(",")]:
            variants = {"unmerged eager": model, "ToMe eager": tome}
            if not args.no_compile:
                variants.update({"unmerged compile": torch.compile(model), "ToMe compile": torch.compile(tome)})
            pixels = torch.randn(
                batch,
                *model.patch_embed.proj.weight.shape[1:2],
                *model.patch_embed.img_size,
                device="cuda",
                dtype=dtype,
            )
            seconds = time_variants(variants, pixels, args.rounds, args.iterations)
            for mode in ("eager", "compile"):
                if f"ToMe {mode}" in seconds:
                    row = {
                        "model": arch,
                        "r": args.r,
                        "merge": args.merge,
                        "dtype": args.dtype,
                        "batch": batch,
                        "mode": mode,
                        "unmerged_img_s": batch / seconds[f"unmerged {mode}"],
                        "tome_img_s": batch / seconds[f"ToMe {mode}"],
                        "speedup": seconds[f"unmerged {mode}"] / seconds[f"ToMe {mode}"],
                    }
                    rows.append(row)
                    print(
                        f"{arch:<24} batch {batch:>3} {mode:<8} unmerged {row['unmerged_img_s']:>8.1f} img/s  "
                        f"ToMe {row['tome_img_s']:>8.1f} img/s  {row['speedup']:.2f}x",
                        flush=True,
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
