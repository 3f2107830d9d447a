"""What one tome-tune candidate costs on a given model: eager scoring per image, export, timing and a held-out
pass in ONNX Runtime, from which docs/tuning.md works out the time of a full run.

    python benchmarks/tune_cost.py --model vit_base_patch16_224 --r 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tome_deploy.artifact.formulations import merge_for_target
from tome_deploy.core.schedule_search import structured_candidates
from tome_deploy.jobs.export import patch_for_export, time_against, unmerged_export
from tome_deploy.models.adapter import describe
from tome_deploy.models.loading.dispatch import load_model
from tome_deploy.models.patch import apply_tome
from tome_deploy.onnx_export.export import export_onnx
from tome_deploy.runtime.factory import open_runner
from tome_deploy.runtime.throughput import time_side_by_side


def per_image_seconds(run, pixels: np.ndarray, batch: int) -> float:
    """Median seconds per image of run(batch of pixels), through the project's one timing loop."""
    calls = {"run": lambda: run(pixels[:batch])}
    return time_side_by_side(calls, rounds=max(1, len(pixels) // batch), warmup=1)["run"] / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    shape = describe(loaded.adapter, loaded.model)
    size = loaded.adapter.input_spec(loaded.model).shape
    pixels = np.random.default_rng(0).standard_normal((args.images, *size)).astype(np.float32)
    print(
        f"{args.model}: {shape.tokens} tokens, {shape.depth} blocks, {len(structured_candidates(shape))} structured schedules"
    )
    for label, model in (
        ("unmerged", loaded.model),
        (f"r={args.r}", apply_tome(loaded.model, args.r, adapter=loaded.adapter)[0]),
    ):
        with torch.inference_mode():
            seconds = per_image_seconds(lambda x, m=model: m(torch.from_numpy(x)), pixels, 16)
        print(f"eager scoring, {label}: {seconds * 1000:.1f} ms/image")
    options = dict(
        merge=merge_for_target(None, "onnxruntime"),
        strict=False,
        opset=18,
        batch_size=8,
        static_batch=False,
        precision="fp32",
        target="onnxruntime",
    )
    with tempfile.TemporaryDirectory() as folder:
        plain = unmerged_export(loaded, Path(folder), print, **options)
        start = time.perf_counter()
        tome, _, metadata = patch_for_export(loaded, args.r, **options)
        path = export_onnx(tome, metadata, Path(folder) / "tome.onnx").path
        print(f"ToMe export: {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        timings = time_against(plain, path, metadata, "onnxruntime")
        ratio = timings["unmerged"].median_s / timings["tome"].median_s
        print(
            f"timing against the plain export (10 rounds, batch 8): {time.perf_counter() - start:.1f} s ({ratio:.2f}x)"
        )
        with open_runner(path) as runner:
            seconds = per_image_seconds(lambda x: runner.infer({"pixel_values": x}), pixels, 8)
        print(f"held-out pass in ONNX Runtime: {seconds * 1000:.1f} ms/image")


if __name__ == "__main__":
    main()
