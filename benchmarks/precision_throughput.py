"""ToMe on top of reduced precision in OpenVINO (CPU): speed against plain fp32, and what it costs in quality.

Speed, per model and batch, all variants timed interleaved (runtime/throughput.time_side_by_side):
  plain fp32          torch.onnx.export of the unpatched model, OpenVINO inference precision f32
  plain bf16          the same file with OpenVINO's bf16 inference precision (its default on bf16 CPUs)
  ToMe fp32           the ToMe export, f32
  ToMe bf16           tome-export --precision bf16 (the IR: MatMuls bf16, matching and the rest f32)
  ToMe bf16 naive     the fp32 ToMe export with OpenVINO's bf16 inference precision (matching in bf16 too)
  ToMe bf16 keys f32  the bf16 IR with the attention's qkv MatMul (the keys the metric reads) kept f32 too
Each is reported against plain fp32, and the ToMe bf16 rows against plain bf16 (ToMe's factor on top).

Quality on the bundled digits ViT (all 1797 digits, ToMe at --digits-r): accuracy, top-1 agreement with
the fp32 ToMe model in PyTorch, and merge agreement (validation/merge_agreement.py); with one more variant,
  ToMe bf16 plain     the bf16 IR compiled with no configuration (OpenVINO's default precision, bf16 here).
--models "" measures the quality part only.

    python benchmarks/precision_throughput.py --models vit_small_patch16_224,vit_base_patch16_224 --batches 1,8
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from common import file_stem, markdown_table, whole_numbers, write_json

from tome_deploy.artifact.onnx_file import load_onnx
from tome_deploy.jobs.export import export_model
from tome_deploy.models.loading.source import ModelSource
from tome_deploy.onnx_export.export import export_plain
from tome_deploy.runtime.openvino import write_ir
from tome_deploy.runtime.throughput import time_side_by_side

F32, BF16 = {"INFERENCE_PRECISION_HINT": "f32"}, {"INFERENCE_PRECISION_HINT": "bf16"}
KEYS_SCOPE = "attn.qkv"  # the module whose MatMul computes the keys (and queries and values)


def cpu_features() -> str:
    """The CPU's reduced-precision instructions (from /proc/cpuinfo) and what OpenVINO says it can use."""
    import openvino as ov

    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    wanted = ["avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx_vnni"]
    present = [flag for flag in wanted if flag in flags] or ["none of " + ", ".join(wanted)]
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return f"CPU flags: {', '.join(present)}; OpenVINO CPU capabilities: {', '.join(capabilities)}"


def keys_f32_ir(onnx_path: Path, xml: Path) -> Path:
    """The bf16 IR with the qkv MatMuls kept f32 as well (write_ir's bf16 rewrite, qkv added to the kept set)."""
    import openvino as ov

    from tome_deploy.artifact.matching import SCOPE_KEY, matching_nodes
    from tome_deploy.runtime.openvino_bf16 import bf16_model

    proto = load_onnx(onnx_path)
    keys = {
        node.name
        for node in proto.graph.node
        if node.op_type == "MatMul" and any(KEYS_SCOPE in p.value for p in node.metadata_props if p.key == SCOPE_KEY)
    }
    model = ov.Core().read_model(str(onnx_path))
    bf16_model(model, matching_nodes(proto) | keys)
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return xml


def compiled(path: Path, config: dict[str, Any], threads: int) -> Any:
    import openvino as ov

    return ov.Core().compile_model(str(path), "CPU", {**config, "INFERENCE_NUM_THREADS": threads})


def model_variants(model: str, r: int, folder: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """label -> (file, OpenVINO config) for one model; files exported through the library's jobs."""
    stem = file_stem(model)
    tome = export_model(ModelSource(model), folder / f"{stem}_r{r}.onnx", r=r, validate=False)
    base = export_model(ModelSource(model), folder / f"{stem}_r0.onnx", r=0, validate=False)
    plain = export_plain(base.loaded.model, base.export.metadata, folder / f"{stem}_plain.onnx")
    ir = write_ir(tome.export.path, folder / f"{stem}_r{r}_bf16.xml", "bf16")
    keys_ir = keys_f32_ir(tome.export.path, folder / f"{stem}_r{r}_bf16_keys_f32.xml")
    return {
        "plain fp32": (plain, F32),
        "plain bf16": (plain, BF16),
        "ToMe fp32": (tome.export.path, F32),
        "ToMe bf16": (ir, F32),
        "ToMe bf16 naive": (tome.export.path, BF16),
        "ToMe bf16 keys f32": (keys_ir, F32),
    }


def speed_rows(model: str, variants: dict, batches: list[int], threads: int, rounds: int) -> list[dict]:
    shape = load_onnx(variants["plain fp32"][0]).graph.input[0].type.tensor_type.shape
    input_size = [dim.dim_value for dim in shape.dim[1:]]
    rows = []
    for batch in batches:
        pixels = np.random.default_rng(0).standard_normal((batch, *input_size)).astype(np.float32)  # [B, C, H, W]
        runs: dict[str, Callable[[], object]] = {}
        for label, (path, config) in variants.items():
            request = compiled(path, config, threads).create_infer_request()
            runs[label] = functools.partial(request.infer, {0: pixels})
        medians = time_side_by_side(runs, rounds=rounds, warmup=2)
        for label, median in medians.items():
            reduced_plain = "plain bf16" if "bf16" in label and label.startswith("ToMe") else None
            rows.append(
                {
                    "model": model,
                    "batch": batch,
                    "variant": label,
                    "ms": median * 1e3,
                    "vs_plain_fp32": medians["plain fp32"] / median,
                    "vs_plain_bf16": medians[reduced_plain] / median if reduced_plain else None,
                }
            )
        print(f"  timed {model} batch {batch}", file=sys.stderr, flush=True)
    return rows


def digits_rows(r: int, folder: Path, threads: int) -> list[dict]:
    """Accuracy, top-1 and merge agreement with fp32 ToMe (PyTorch) of each digits variant on all 1797 digits."""
    from tome_deploy.models.digits import ARCH, digits_data, load_digits_vit, pixels_from_digits
    from tome_deploy.models.patch import apply_tome
    from tome_deploy.validation.merge_agreement import (
        match_twin,
        merge_agreement,
        recording_matches,
        runtime_matches,
    )

    data = digits_data()
    pixels = pixels_from_digits(torch.as_tensor(data["images"]).float())  # [1797, 3, 32, 32]
    labels = np.asarray(data["labels"])
    tome, _ = apply_tome(load_digits_vit(), r)
    with torch.inference_mode(), recording_matches(tome) as recorded:
        reference = tome(pixels).argmax(-1).numpy()
        reference_matches = dict(recorded)
    tome_onnx = export_model(ModelSource(ARCH), folder / f"digits_r{r}.onnx", r=r, validate=False).export.path
    bf16_ir = write_ir(tome_onnx, folder / f"digits_r{r}_bf16.xml", "bf16")
    variants = {
        "ToMe fp32": (tome_onnx, F32),
        "ToMe bf16": (bf16_ir, F32),
        "ToMe bf16 plain": (bf16_ir, {}),
        "ToMe bf16 naive": (tome_onnx, BF16),
        "ToMe bf16 keys f32": (keys_f32_ir(tome_onnx, folder / f"digits_r{r}_keys.xml"), F32),
    }
    rows = [{"variant": "PyTorch fp32 ToMe", "accuracy": float(np.mean(reference == labels))}]
    for label, (path, config) in variants.items():
        twin_folder = folder / file_stem(label)
        twin_folder.mkdir()
        twin, tensors = match_twin(path, twin_folder)
        model = compiled(twin, config, threads)
        outputs = [model(pixels[i : i + 256].numpy()) for i in range(0, len(pixels), 256)]
        names = [port.get_any_name() for port in model.outputs]
        merged = {name: np.concatenate([out[i] for out in outputs]) for i, name in enumerate(names)}
        top1 = merged["logits"].argmax(-1)
        rows.append(
            {
                "variant": label,
                "accuracy": float(np.mean(top1 == labels)),
                "top1_agreement": float(np.mean(top1 == reference)),
                "merge_agreement": merge_agreement(reference_matches, runtime_matches(merged, tensors)),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--digits-r", type=int, default=3)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    print(cpu_features())
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="tome-precision-") as temp:
        folder = Path(temp)
        quality = digits_rows(args.digits_r, folder, args.threads)
        for model in filter(None, args.models.split(",")):
            (folder / file_stem(model)).mkdir()
            variants = model_variants(model, args.r, folder / file_stem(model))
            rows += speed_rows(model, variants, whole_numbers(args.batches), args.threads, args.rounds)
    print(f"\nOpenVINO, {args.threads} threads, ToMe r={args.r}, interleaved medians:\n")
    print(
        markdown_table(
            ["model", "batch", "variant", "ms / batch", "vs plain fp32", "vs plain bf16"],
            [
                [
                    row["model"],
                    row["batch"],
                    row["variant"],
                    f"{row['ms']:.1f}",
                    f"{row['vs_plain_fp32']:.2f}x",
                    "" if row["vs_plain_bf16"] is None else f"{row['vs_plain_bf16']:.2f}x",
                ]
                for row in rows
            ],
        )
    )
    print(f"\nDigits ViT, ToMe r={args.digits_r}, all 1797 digits, against the fp32 ToMe model in PyTorch:\n")
    print(
        markdown_table(
            ["variant", "accuracy", "top-1 agreement", "merge agreement"],
            [
                [
                    row["variant"],
                    f"{row['accuracy']:.2%}",
                    f"{row['top1_agreement']:.2%}" if "top1_agreement" in row else "",
                    f"{row['merge_agreement']:.2%}" if "merge_agreement" in row else "",
                ]
                for row in quality
            ],
        )
    )
    write_json(rows + [{"digits": row} for row in quality], args.json)


if __name__ == "__main__":
    main()
