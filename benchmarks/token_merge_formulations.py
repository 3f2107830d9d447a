"""The fused tome::TokenMerge op vs the scatter and matmul formulations, side by side in one run.

What is timed: the merge steps of one ToMe forward pass (the 12 blocks of an r=16 schedule at 224x224,
clamped where the tokens run out), i.e. merge_weighted on the matched tokens; matching is identical
for all three and left out. Models: ViT-S/16 (C=384) and ViT-B/16 (C=768); batches 1, 8, 64. Each
round runs every formulation once in turn (noise hits all alike); the table shows medians.

Backends:
  torch   PyTorch eager on the device present. On CPU the fused op is its plain reference (a loop
          over the r pairs); on CUDA it is the Triton kernel.
  ort     ONNX Runtime CPU on an exported graph of the same merge steps. The fused op runs there as an
          onnxruntime-extensions Python op (for validation, not speed: its outputs cross into C++ as
          Python lists).

    python benchmarks/token_merge_formulations.py                          # both backends, ~4 min on 2 cores
    python benchmarks/token_merge_formulations.py --backends torch --rounds 30
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from common import markdown_table, whole_numbers, write_json

from tome_deploy.core.merge import Match, bipartite_match, merge_weighted
from tome_deploy.core.schedule import resolve_schedule
from tome_deploy.core.tracing import onnx_export_tracing
from tome_deploy.onnx_export.export import translation_table
from tome_deploy.runtime.factory import open_runner
from tome_deploy.runtime.throughput import time_side_by_side

MODELS = {"ViT-S/16": 384, "ViT-B/16": 768}  # channels
TOKENS, DEPTH, PREFIX, R = 197, 12, 1, 16  # 224x224, patch 16, class token
FORMULATIONS = ("scatter", "matmul", "plugin")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--batches", default="1,8,64")
    parser.add_argument(
        "--backends", default="torch,ort", help="torch (eager, on the device present), ort (ONNX Runtime CPU)"
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--ort-rounds", type=int, default=3, help="rounds for ONNX Runtime (its Python op is slow)")
    parser.add_argument(
        "--threads", type=int, default=None, help="PyTorch and ONNX Runtime intra-op threads (default: all cores)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser.parse_args()


class MergeSteps(torch.nn.Module):
    """The merge steps of one forward pass: x [B, N0, C], size [B, N0, 1], then (source_a, destination_b,
    unmerged_a) per merging block -> (x, size) after the last one."""

    def __init__(self, formulation: str, tokens: list[int]):
        super().__init__()
        self.formulation, self.tokens = formulation, tokens  # tokens entering each merging block

    def forward(self, x, size, indices: tuple):
        for layer, tokens in enumerate(self.tokens):
            match = Match(*indices[3 * layer : 3 * layer + 3], tokens, PREFIX)
            x, size = merge_weighted(x, size, match, self.formulation)
        return x, size


def merging_blocks() -> list[tuple[int, int]]:
    """(tokens in, effective r) of every block that merges under the benchmark's schedule."""
    with warnings.catch_warnings():  # r=16 is clamped in the last block, as in every ViT-S/B r=16 model
        warnings.simplefilter("ignore")
        schedule = resolve_schedule(R, TOKENS, DEPTH, PREFIX)
    return [(tokens, r) for tokens, r in zip(schedule.tokens, schedule.effective) if r > 0]


def make_inputs(batch: int, channels: int, device: str) -> tuple:
    """(x, size, indices): random tokens, unit sizes and ToMe matches (from random metrics) of every merging block."""
    gen = torch.Generator().manual_seed(batch * channels)
    x, size = torch.randn(batch, TOKENS, channels, generator=gen), torch.ones(batch, TOKENS, 1)
    indices = []
    for tokens, r in merging_blocks():
        indices += bipartite_match(torch.randn(batch, tokens, 64, generator=gen), r, PREFIX)[:3]
    return x.to(device), size.to(device), tuple(t.to(device) for t in indices)


def torch_runs(inputs: tuple) -> dict:
    tokens = [n for n, _ in merging_blocks()]
    modules = {f: MergeSteps(f, tokens) for f in FORMULATIONS}

    def run(module):
        with torch.inference_mode():
            module(*inputs)

    return {f: (lambda m=m: run(m)) for f, m in modules.items()}


def export_merge_steps(formulation: str, inputs: tuple, path: Path) -> Path:
    batch = torch.export.Dim("batch", min=1, max=4096)
    with onnx_export_tracing(topk_ties=True):  # the merge ops tome-export writes (GatherND, ScatterND)
        program = torch.onnx.export(
            MergeSteps(formulation, [n for n, _ in merging_blocks()]).eval(),
            inputs,
            dynamo=True,
            opset_version=18,
            verbose=False,
            dynamic_shapes=({0: batch}, {0: batch}, tuple({0: batch} for _ in inputs[2])),
            custom_translation_table=translation_table(formulation),
        )
    program.save(str(path))
    return path


def ort_runs(paths: dict, inputs: tuple, threads: int | None, active: contextlib.ExitStack) -> dict:
    """One call per formulation on its ONNX Runtime runner, kept active until `active` closes."""
    runners = {f: active.enter_context(open_runner(p, threads=threads)) for f, p in paths.items()}
    arrays = [t.numpy() for t in (inputs[0], inputs[1], *inputs[2])]
    feeds = {f: dict(zip(r.input_names, arrays)) for f, r in runners.items()}
    return {f: (lambda r=r, feed=feeds[f]: r.infer(feed)) for f, r in runners.items()}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backends = args.backends.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models.split(","):
            channels = MODELS[model]
            paths = {}
            if "ort" in backends:  # exported once per model, at batch 2, dynamic batch
                example = make_inputs(2, channels, "cpu")
                paths = {f: export_merge_steps(f, example, Path(folder) / f"{channels}_{f}.onnx") for f in FORMULATIONS}
            for batch in whole_numbers(args.batches):
                for backend in backends:
                    on = device if backend == "torch" else "cpu"
                    inputs = make_inputs(batch, channels, on)
                    with contextlib.ExitStack() as active:
                        runs = (
                            torch_runs(inputs) if backend == "torch" else ort_runs(paths, inputs, args.threads, active)
                        )
                        rounds = args.rounds if backend == "torch" else args.ort_rounds
                        medians = time_side_by_side(
                            runs, rounds=rounds, sync=torch.cuda.synchronize if on == "cuda" else None
                        )
                    label = f"torch-{on}" if backend == "torch" else "ort-cpu"
                    rows.append(
                        {
                            "model": model,
                            "batch": batch,
                            "backend": label,
                            **{f"{f}_ms": 1000 * medians[f] for f in FORMULATIONS},
                        }
                    )
                    print(
                        f"  {model} batch {batch} {label}: "
                        + ", ".join(f"{f} {1000 * medians[f]:.2f} ms" for f in FORMULATIONS),
                        file=sys.stderr,
                        flush=True,
                    )
    header = ["model", "batch", "backend", "scatter ms", "matmul ms", "fused ms", "fused vs scatter", "fused vs matmul"]
    print(
        markdown_table(
            header,
            [
                [
                    r["model"],
                    r["batch"],
                    r["backend"],
                    f"{r['scatter_ms']:.2f}",
                    f"{r['matmul_ms']:.2f}",
                    f"{r['plugin_ms']:.2f}",
                    f"{r['scatter_ms'] / r['plugin_ms']:.2f}x",
                    f"{r['matmul_ms'] / r['plugin_ms']:.2f}x",
                ]
                for r in rows
            ],
        )
    )
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
