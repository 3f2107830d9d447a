"""ToMe on top of int8 on CPU: plain fp32, plain int8, ToMe fp32 and ToMe int8, timed interleaved in one process.

Per model (random weights, timm names): the plain model as a user exports it (`torch.onnx.export`) and the
ToMe r=16 export, each in fp32 and quantized by tome-deploy's int8 quantizers (onnx_export/quantize.py):
ONNX Runtime dynamic and static QDQ, and NNCF for OpenVINO (an IR). Within a runtime, every variant runs
in turn, pass by pass, at each batch size. Each row is reported against plain fp32 in the same runtime,
and ToMe int8 also against plain int8 (the ToMe factor on top of int8). Static calibration for timing uses
random normal pixels (the speed of an int8 graph does not depend on its ranges).

Then quality, on the bundled digits ViT over all 1797 digits: the plain model (r=0) and ToMe r=3, fp32 and
each int8 quantizer: accuracy, top-1 agreement with the same model's fp32 export and, for ToMe, merge
agreement with the fp32 ToMe model in PyTorch; static quantizers calibrate on 60 digits (every 30th).

    python benchmarks/int8_throughput.py --threads 2                                 # ViT-S/16 and ViT-B/16, batch 1 and 8
    python benchmarks/int8_throughput.py --models vit_small_patch16_224 --batches 8 --rounds 5 --threads 2
    python benchmarks/int8_throughput.py --models "" --threads 2                      # the digits quality table only
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import BASELINE, export_variants, markdown_table, whole_numbers, write_json

from tome_deploy.runtime.factory import RUNTIME_LABELS, open_runner
from tome_deploy.runtime.throughput import time_interleaved

R = 16
DIGITS_R = 3
CALIBRATION_IMAGES = 32  # random-pixel calibration for the timed models
DIGITS_CALIBRATION = slice(0, 1797, 30)  # 60 digits
CPU_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cpu_features() -> str:
    """The int8 / bf16 instruction sets this CPU reports (/proc/cpuinfo), and its model name."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    present = [flag for flag in CPU_FEATURES if flag in flags]
    absent = [flag for flag in CPU_FEATURES if flag not in flags]
    return f"{name}; present: {', '.join(present) or 'none'}; absent: {', '.join(absent) or 'none'}"


def quantized_variants(
    fp32: dict[str, Path], folder: Path, runtimes: list[str], calibration: np.ndarray
) -> dict[str, dict[str, Path]]:
    """{runtime: {"<kind> <precision>": file}}: each fp32 file ({kind: file}) and its int8 versions, per
    runtime; the static quantizers calibrate on `calibration` ([n, 3, H, W])."""
    import openvino as ov

    from tome_deploy.onnx_export.quantize import quantize_onnxruntime, quantize_openvino

    variants: dict[str, dict[str, Path]] = {}
    for runtime in runtimes:
        files: dict[str, Path] = {}
        for kind, path in fp32.items():
            files[f"{kind} fp32"] = path
            if runtime == "onnxruntime":
                for mode, pixels in (("dynamic", None), ("static", calibration)):
                    files[f"{kind} int8 {mode}"] = folder / f"{path.stem}_{mode}.onnx"
                    quantize_onnxruntime(path, files[f"{kind} int8 {mode}"], pixels)
            else:
                files[f"{kind} int8 nncf"] = folder / f"{path.stem}_nncf.xml"
                ov.save_model(
                    quantize_openvino(path, calibration), str(files[f"{kind} int8 nncf"]), compress_to_fp16=False
                )
            say(f"  quantized {kind} for {runtime}")
        variants[runtime] = files
    return variants


def speed_rows(model: str, variants, metadata, batches: list[int], rounds: int, threads) -> list[dict[str, Any]]:
    rows = []
    for runtime, files in variants.items():
        for batch in batches:
            say(f"  timing {len(files)} variants in {runtime} at batch {batch} ...")
            timings = time_interleaved(
                files, metadata.input.name, metadata.input.shape, batch, rounds=rounds, threads=threads, runtime=runtime
            )
            plain = timings["plain fp32"].median_s
            for label, timing in timings.items():
                kind, precision = label.split(" ", 1)
                on_plain_same = timings.get(f"plain {precision}", timing).median_s / timing.median_s
                rows.append(
                    dict(
                        model=model,
                        runtime=RUNTIME_LABELS[runtime],
                        batch=batch,
                        variant=label.replace("tome", f"ToMe r={R}"),
                        images_per_s=round(timing.images_per_s, 2),
                        vs_plain_fp32=round(plain / timing.median_s, 2),
                        tome_factor_on_same_precision=round(on_plain_same, 2) if kind == "tome" else "",
                    )
                )
    return rows


def digits_quality(folder: Path, runtimes: list[str]) -> list[dict[str, Any]]:
    """Accuracy and top-1 agreement with the same model's fp32 export, plain (r=0) and ToMe r=3, over 1797
    digits; for ToMe also merge agreement with the fp32 ToMe model in PyTorch (validation/merge_agreement.py)."""
    import torch

    from tome_deploy.jobs.export import export_model
    from tome_deploy.models.digits import digits_data, load_digits_vit, pixels_from_digits
    from tome_deploy.models.patch import apply_tome
    from tome_deploy.validation.merge_agreement import recording_matches

    data = digits_data()
    pixels = pixels_from_digits(torch.from_numpy(data["images"].astype(np.float32))).numpy()  # [1797, 3, 32, 32]
    labels = data["labels"].astype(np.int64)
    tome, _ = apply_tome(load_digits_vit(), DIGITS_R)
    with torch.inference_mode(), recording_matches(tome) as recorded:
        tome(torch.from_numpy(pixels))
        reference_matches = dict(recorded)
    fp32 = {}
    for kind, r in (("plain", 0), ("tome", DIGITS_R)):
        fp32[kind] = folder / f"digits_r{r}.onnx"
        export_model("tome_digits_vit", fp32[kind], r=r, validate=False)
    rows = []
    for runtime, files in quantized_variants(fp32, folder, runtimes, pixels[DIGITS_CALIBRATION]).items():
        runs = {
            label: classify(path, runtime, pixels, folder / f"twin_{runtime}_{index}")
            for index, (label, path) in enumerate(files.items())
        }
        for label, (classes, agreement) in runs.items():
            kind = label.split(" ")[0]
            rows.append(
                dict(
                    runtime=RUNTIME_LABELS[runtime],
                    variant=label.replace("tome", f"ToMe r={DIGITS_R}"),
                    accuracy=round(float(np.mean(classes == labels)) * 100, 2),
                    top1_agreement_with_fp32=round(float(np.mean(classes == runs[f"{kind} fp32"][0])) * 100, 2),
                    merge_agreement=round(agreement(reference_matches) * 100, 2) if kind == "tome" else "",
                )
            )
    return rows


def classify(path: Path, runtime: str, pixels: np.ndarray, twin_folder: Path):
    """(class index per image [n], reference matches -> merge agreement) of the file in `runtime`, run
    through its match twin (OpenVINO at f32 inference precision, as tome-deploy runs it)."""
    from tome_deploy.validation.merge_agreement import match_twin, merge_agreement, runtime_matches

    twin_folder.mkdir()
    twin, tensors = match_twin(path, twin_folder)
    with open_runner(twin, runtime) as runner:
        outputs = [runner.infer({"pixel_values": pixels[i : i + 256]}) for i in range(0, len(pixels), 256)]
    merged = {name: np.concatenate([out[name] for out in outputs]) for name in outputs[0]}
    return merged["logits"].argmax(1), lambda reference: merge_agreement(reference, runtime_matches(merged, tensors))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_small_patch16_224,vit_base_patch16_224")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--runtimes", default="onnxruntime,openvino")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per batch size")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
    parser.add_argument("--no-quality", action="store_true", help="skip the digits quality table")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    runtimes = [name for name in args.runtimes.split(",") if name]
    print(f"CPU: {cpu_features()}\n")
    speed: list[dict[str, Any]] = []
    quality: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for model in [name for name in args.models.split(",") if name]:
            say(f"{model}: exporting plain and ToMe r={R} ...")
            outcomes = export_variants(model, {f"r={R}": R}, folder, plain=True)
            fp32 = {"plain": outcomes[BASELINE].export.path, "tome": outcomes[f"r={R}"].export.path}
            metadata = outcomes[f"r={R}"].export.metadata
            calibration = np.random.default_rng(0).standard_normal((CALIBRATION_IMAGES, *metadata.input.shape))
            variants = quantized_variants(fp32, folder, runtimes, calibration.astype(np.float32))
            speed += speed_rows(model, variants, metadata, whole_numbers(args.batches), args.rounds, args.threads)
        if not args.no_quality:
            say("digits quality ...")
            quality = digits_quality(folder, runtimes)
    header = ["model", "runtime", "batch", "variant", "img/s", "vs plain fp32", "ToMe factor on plain, same precision"]
    print(markdown_table(header, [[row[key] for key in speed[0]] for row in speed]) if speed else "")
    if quality:
        print()
        header = ["runtime", "variant (digits ViT)", "accuracy %", "top-1 agreement with fp32 %", "merge agreement %"]
        print(markdown_table(header, [list(row.values()) for row in quality]))
    write_json(speed + quality, args.json)


if __name__ == "__main__":
    main()
