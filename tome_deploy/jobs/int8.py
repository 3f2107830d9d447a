"""The int8 step of the export job: choose the quantization, read the calibration images, quantize.

`--precision int8` quantizes the fp32 export with onnx_export/quantize.py. For ONNX Runtime it is dynamic
without `--data` and static QDQ with it (`--quantization` says which explicitly); OpenVINO's NNCF is static
only, so it needs `--data`.

Calibration images are read from `--data` as tome-tune reads them. The folder is read by `quality.data.read_image_folder` and split by `quality.split.split_indices` with
tome-tune's defaults (half held out, seed 0, stratified by class when the folder has classes): the
quantizer calibrates on the calibration part only, so an export tuned and quantized on the same folder
never looked at the held-out images tome-tune judged it on. At most MAX_CALIBRATION_IMAGES of that part
are used, evenly spaced through it (the split is ordered by class, so every class is seen)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tome_deploy.errors import InvalidInputError
from tome_deploy.models.loading.dispatch import LoadedModel
from tome_deploy.onnx_export.quantize import INT8_MODES, quantize_onnxruntime, quantize_openvino, tool_version
from tome_deploy.quality.data import DataConfig, check_decoded, fingerprint_files, read_image_folder
from tome_deploy.quality.split import split_indices

MAX_CALIBRATION_IMAGES = 128
SPLIT_SEED = 0  # tome-tune's default --split-seed
HELD_OUT_FRACTION = 0.5  # tome-tune's default --held-out


@dataclass(frozen=True)
class CalibrationSet:
    """The images a static quantizer calibrates on, preprocessed, and what identifies them."""

    pixels: np.ndarray  # float32 [count, 3, H, W], the model's preprocessing
    files: tuple[str, ...]  # relative to the folder, in order
    fingerprint: str  # sha256 hex of (relative path + bytes) of those files, in order

    @property
    def count(self) -> int:
        return len(self.files)


def read_calibration_set(data: str | Path, loaded: LoadedModel, labels: Optional[str | Path] = None) -> CalibrationSet:
    """The calibration part of the image folder `data`, preprocessed for `loaded`'s model. InvalidInputError
    for a folder tome-tune would refuse, for fewer than 2 images, or when no chosen image decodes."""
    images = read_image_folder(data, labels)
    calibration, _ = split_indices(
        len(images.files), images.labels, held_out_fraction=HELD_OUT_FRACTION, seed=SPLIT_SEED
    )
    chosen = evenly_spaced(calibration, MAX_CALIBRATION_IMAGES)
    model_config = loaded.adapter.data_config(loaded.model)
    config = DataConfig(**{key: model_config[key] for key in DataConfig.__annotations__})
    pixels, decoded = images.pixels(chosen, config)
    check_decoded(images, len(decoded))
    files = tuple(images.files[index] for index in decoded)
    return CalibrationSet(pixels, files, fingerprint_files(images.root, files))


def evenly_spaced(indices: list[int], most: int) -> list[int]:
    """At most `most` of `indices`, spread evenly from the first (all of them when there are that few)."""
    if len(indices) <= most:
        return list(indices)
    return [indices[round(i * len(indices) / most)] for i in range(most)]


def int8_mode(runtime: str, data: Optional[str | Path], quantization: Optional[str]) -> str:
    """ "dynamic" or "static": what `--quantization` asks, else static with `--data` and dynamic without it.
    InvalidInputError for static without `--data`, for `--data` with dynamic, and for OpenVINO dynamic."""
    if quantization is not None and quantization not in INT8_MODES:
        raise InvalidInputError(f"unknown --quantization {quantization!r}; choose one of {', '.join(INT8_MODES)}")
    mode = quantization or ("static" if data is not None or runtime == "openvino" else "dynamic")
    if mode == "dynamic" and runtime == "openvino":
        raise InvalidInputError(
            "--precision int8 for OpenVINO is static (NNCF) only; drop --quantization dynamic and pass --data DIR of calibration images"
        )
    if mode == "static" and data is None:
        where = "for OpenVINO (NNCF)" if runtime == "openvino" else "(static QDQ)"
        raise InvalidInputError(
            f"--precision int8 {where} calibrates on images: pass --data DIR (a folder of images, as for tome-tune)"
            + ("" if runtime == "openvino" else ", or --quantization dynamic, which needs none")
        )
    if mode == "dynamic" and data is not None:
        raise InvalidInputError(
            "--data gives calibration images, which dynamic quantization does not use; drop --data or --quantization dynamic"
        )
    return mode


def quantize_export(
    fp32_onnx: Path, output: Path, runtime: str, calibration: Optional[CalibrationSet]
) -> dict[str, Any]:
    """Quantize the fp32 export `fp32_onnx` for `runtime` and write it to `output` (ONNX for ONNX Runtime;
    for OpenVINO the openvino.Model is returned under "model" for the caller to write as an IR).
    Returns the record of what was done: mode, runtime, tool, and the calibration set when there was one."""
    record: dict[str, Any] = {"mode": "static" if calibration is not None else "dynamic", "runtime": runtime}
    record["tool"] = tool_version(runtime)
    if calibration is not None:
        record |= {"fingerprint": calibration.fingerprint, "count": calibration.count}
    if runtime == "openvino":
        if calibration is None:
            raise InvalidInputError("--precision int8 for OpenVINO calibrates on images: pass --data DIR")
        return record | {"model": quantize_openvino(fp32_onnx, calibration.pixels)}
    quantize_onnxruntime(fp32_onnx, output, None if calibration is None else calibration.pixels)
    return record
