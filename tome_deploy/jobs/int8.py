"""The int8 step of the export job: read the calibration images, quantize, write the artifact.

`--precision int8` quantizes the fp32 export with onnx_export/quantize.py (`int8_mode` says which way).

Calibration images are read from `--data` as tome-tune reads them (tome-tune --precision int8 calibrates
each candidate on `calibration_set_of` its own calibration part). The folder is read by `quality.data.read_image_folder` and split by `quality.split.split_indices` with
tome-tune's defaults (half held out, seed 0, stratified by class when the folder has classes): the
quantizer calibrates on the calibration part only, so an export tuned and quantized on the same folder
never looked at the held-out images tome-tune judged it on. At most MAX_CALIBRATION_IMAGES of that part
are used, evenly spaced through it (the split is ordered by class, so every class is seen)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tome_deploy.artifact.matching import matching_nodes
from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.onnx_file import load_onnx
from tome_deploy.errors import InvalidInputError
from tome_deploy.models.adapter import checked_input_spec
from tome_deploy.models.loading.dispatch import LoadedModel
from tome_deploy.onnx_export.quantize import quantize_onnxruntime, quantize_openvino
from tome_deploy.output_files import write_atomically
from tome_deploy.quality.data import DataConfig, ImageSet, check_decoded, fingerprint_files, read_image_folder
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
    config = DataConfig.of(checked_input_spec(loaded.adapter, loaded.model, loaded.weights), "--precision int8 --data")
    return calibration_set_of(images, calibration, config)


def calibration_set_of(images: ImageSet, calibration: list[int], config: DataConfig) -> CalibrationSet:
    """The calibration set drawn from `calibration` (indices into images.files, the calibration part of a
    split): at most MAX_CALIBRATION_IMAGES of them, evenly spaced, decoded with `config`. InvalidInputError
    when none decodes."""
    pixels, decoded = images.pixels(evenly_spaced(calibration, MAX_CALIBRATION_IMAGES), config)
    check_decoded(images, len(decoded))
    files = tuple(images.files[index] for index in decoded)
    return CalibrationSet(pixels, files, fingerprint_files(images.root, files))


def evenly_spaced(indices: list[int], most: int) -> list[int]:
    """At most `most` of `indices`, spread evenly from the first (all of them when there are that few)."""
    if len(indices) <= most:
        return list(indices)
    return [indices[round(i * len(indices) / most)] for i in range(most)]


def quantize_to_artifact(
    onnx_path: Path, output: Path, runtime: str, metadata: ToMeMetadata, calibration: Optional[CalibrationSet]
) -> ToMeMetadata:
    """The fp32 ToMe export at `onnx_path` quantized to int8 for `runtime` and written at `output`: an ONNX
    file for ONNX Runtime (dynamic without `calibration`, static QDQ with it), an IR (.xml + .bin) for
    OpenVINO (NNCF, `calibration` required). The file carries `metadata` with its calibration record, which
    is returned."""
    if calibration is not None:
        record = {"data_fingerprint": calibration.fingerprint, "count": calibration.count, "runtime": runtime}
        metadata = dataclasses.replace(metadata, calibration=record)
    if runtime == "openvino":
        if calibration is None:
            raise InvalidInputError("--precision int8 for OpenVINO (NNCF) calibrates on images: pass --data DIR")
        write_int8_ir(
            quantize_openvino(onnx_path, calibration.pixels), output, metadata, matching_nodes(load_onnx(onnx_path))
        )
        return metadata
    quantize_onnxruntime(onnx_path, output, None if calibration is None else calibration.pixels)
    model_proto = load_onnx(output)
    del model_proto.metadata_props[:]
    for key, value in metadata.to_props().items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    write_atomically(output, lambda stream: stream.write(model_proto.SerializeToString()))
    return metadata


def write_int8_ir(model: Any, xml_path: Path, metadata: ToMeMetadata, matching: set[str]) -> None:
    """Write the NNCF-quantized openvino.Model as an IR at `xml_path` (+ .bin), f32 weights where not int8,
    `metadata` in its rt_info. Its matching nodes are written in forms the CPU plugin keeps and carry
    OpenVINO's keep-precision mark (runtime/openvino_bf16.keep_matching_f32), so that a caller who compiles
    it with OpenVINO's default inference precision (bf16 on CPUs that have it) still matches in f32."""
    import openvino as ov

    from tome_deploy.runtime.openvino import RT_INFO_SECTION
    from tome_deploy.runtime.openvino_bf16 import keep_matching_f32, mark_precise

    precise = keep_matching_f32(model, matching)
    for key, value in metadata.to_props().items():
        model.set_rt_info(value, [RT_INFO_SECTION, key])
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    mark_precise(xml_path, precise)
