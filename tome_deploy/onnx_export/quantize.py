"""Int8 post-training quantization of a written ToMe export, by the runtimes' own tools, with matching in fp32.

- ONNX Runtime (`onnxruntime.quantization`): **dynamic** (`quantize_dynamic`: weights int8 ahead of time,
  each activation quantized when it is computed; needs no calibration images) or **static**
  (`quantize_static`, QDQ format: activation ranges measured on calibration images, QuantizeLinear /
  DequantizeLinear pairs before each quantized node). The result is an ONNX file any ONNX Runtime runs.
- OpenVINO: **static** only, NNCF post-training quantization (`nncf.quantize`, transformer preset,
  calibrated) of the graph OpenVINO reads from the export; the caller writes the model as an IR.

What is quantized: the MatMul/Gemm nodes that multiply by a weight (the attention's qkv and output
projections, the MLP, the head). Never quantized: the matching subgraph (artifact/matching.py),
named in `nodes_to_exclude` / NNCF's `IgnoredScope`, so no merge decision sees an int8 value. ONNX Runtime
also leaves the attention's activation x activation products (scores, weighted values) in fp32: quantized,
they cost 0.2 points of top-1 agreement with fp32 on the digits model (docs/runtimes.md#int8).
How the mode is chosen (`int8_mode`): `--quantization dynamic|static` when given; otherwise static when
`--data DIR` gives calibration images and dynamic without them, for ONNX Runtime; always static for OpenVINO.
ONNX Runtime and NNCF are imported inside the functions that use them."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from tome_deploy.artifact.matching import matching_nodes
from tome_deploy.errors import InvalidInputError, MissingDependencyError

INT8_MODES: tuple[str, ...] = ("dynamic", "static")
QUANTIZED_OP_TYPES = ["MatMul", "Gemm"]
MIN_NNCF = (3, 4)
MIN_OPENVINO = (2025, 0)
INT8_EXTRA = "pip install 'tome-deploy[int8]' (or pip install 'nncf>=3.4' 'openvino>=2025.0')"
ORT_CALIBRATION_BATCH = 8  # images per calibration run in ONNX Runtime (dynamic-batch exports)


def check_int8_options(
    precision: str, runtime: str, data: str | Path | None, quantization: Optional[str]
) -> Optional[str]:
    """The int8 mode ("dynamic" or "static") of an int8 export, None for another precision; InvalidInputError
    for --data or --quantization without --precision int8, and for a mode without what it needs."""
    if precision == "int8":
        return int8_mode(runtime, data, quantization)
    given = [flag for flag, value in (("--data", data), ("--quantization", quantization)) if value is not None]
    if given:
        flags = " and ".join(given)
        raise InvalidInputError(
            f"{flags} {'is' if len(given) == 1 else 'are'} for --precision int8; add --precision int8 or drop {flags}"
        )
    return None


def int8_mode(runtime: str, data: Optional[str | Path], quantization: Optional[str]) -> str:
    """The int8 mode, "dynamic" or "static": what `--quantization` asks, else static with `--data` and
    dynamic without it (ONNX Runtime), static for OpenVINO (NNCF has no dynamic mode).
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


def weight_products(graph) -> set[str]:
    """Names of the MatMul/Gemm nodes of `graph` (onnx.GraphProto) whose second input is a weight (an initializer)."""
    weights = {init.name for init in graph.initializer}
    return {node.name for node in graph.node if node.op_type in QUANTIZED_OP_TYPES and node.input[1] in weights}


def int8_exclusions(model_proto) -> list[str]:
    """The nodes no int8 quantizer may touch: the matching subgraph, and every MatMul/Gemm that is not a
    product with a weight (attention scores and weighted values; the matching's score MatMul is both)."""
    graph = model_proto.graph
    products = {node.name for node in graph.node if node.op_type in QUANTIZED_OP_TYPES}
    return sorted(matching_nodes(model_proto) | (products - weight_products(graph)))


def static_batch(graph) -> Optional[int]:
    """The fixed batch of the graph's first input, or None when the batch axis is symbolic."""
    dim = graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


def calibration_batches(pixels: np.ndarray, graph, batch: int) -> list[np.ndarray]:
    """pixels [n, 3, H, W] -> the arrays the graph is fed while calibrating, in order: [batch, 3, H, W] each
    (the last one shorter) for a dynamic batch axis; [B, 3, H, W] each for an export with a static batch B,
    the remainder dropped, so InvalidInputError when n < B."""
    fixed = static_batch(graph)
    if fixed is None:
        return [pixels[start : start + batch] for start in range(0, len(pixels), batch)]
    if len(pixels) < fixed:
        raise InvalidInputError(
            f"{len(pixels)} calibration image(s) is fewer than the export's static batch of {fixed}; "
            "pass more images with --data, or export without --static-batch"
        )
    return [pixels[start : start + fixed] for start in range(0, len(pixels) - fixed + 1, fixed)]


def quantize_onnxruntime(source: str | Path, output: str | Path, calibration: Optional[np.ndarray]) -> str:
    """Quantize the ONNX file `source` to int8 for ONNX Runtime and write it to `output`: static QDQ
    calibrated on `calibration` (float32 [n, 3, H, W], preprocessed as the export expects), or dynamic when
    it is None. Returns the mode ("static" or "dynamic")."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    model_proto = onnx.load(str(source), load_external_data=False)
    graph = model_proto.graph
    excluded = int8_exclusions(model_proto)
    options = dict(
        op_types_to_quantize=QUANTIZED_OP_TYPES,
        nodes_to_exclude=excluded,
        weight_type=QuantType.QInt8,
        per_channel=False,
    )
    if calibration is None:
        with _quiet_root_logger():
            quantize_dynamic(str(source), str(output), extra_options={"MatMulConstBOnly": True}, **options)
        return "dynamic"

    input_name = graph.input[0].name
    batches = calibration_batches(calibration, graph, ORT_CALIBRATION_BATCH)

    class Batches(CalibrationDataReader):
        """The calibration images, one batch per call, then None; `set_range` picks the batches of one
        collection round (ONNX Runtime's strided calibration keeps only one round's activations in memory)."""

        def __init__(self) -> None:
            self.remaining: Iterator[np.ndarray] = iter(())

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self.remaining = iter(batches[start_index:end_index])

        def get_next(self) -> Optional[dict[str, np.ndarray]]:
            batch = next(self.remaining, None)
            return None if batch is None else {input_name: batch}

    with _quiet_root_logger():
        quantize_static(
            str(source),
            str(output),
            Batches(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            extra_options={
                "MatMulConstBOnly": True,
                # Products stay fp32 (MatMulIntegerToFloat): the residual stream and the keys are never
                # rounded to int8 after a product, which agreed better on the digits model at no cost in speed.
                "OpTypesToExcludeOutputQuantization": QUANTIZED_OP_TYPES,
                # Ranges are collected batch by batch and merged: memory holds one batch's activations.
                "CalibStridedMinMax": 1,
            },
            **options,
        )
    return "static"


def quantize_openvino(source: str | Path, calibration: np.ndarray) -> Any:
    """The ONNX file `source` read by OpenVINO and quantized by NNCF (static, transformer preset),
    calibrated on `calibration` (float32 [n, 3, H, W]), the matching subgraph ignored: an openvino.Model,
    which `openvino.save_model(model, xml, compress_to_fp16=False)` writes as an IR."""
    import onnx

    ov, nncf = import_nncf()
    model_proto = onnx.load(str(source), load_external_data=False)
    model = ov.Core().read_model(str(source))
    present = {op.get_friendly_name() for op in model.get_ordered_ops()}  # OpenVINO keeps the ONNX node names
    ignored = sorted(set(int8_exclusions(model_proto)) & present)
    items = calibration_batches(calibration, model_proto.graph, 1)
    nncf.set_log_level(logging.ERROR)
    with _captured_output():  # NNCF draws progress bars on the terminal
        return nncf.quantize(
            model,
            nncf.Dataset(items),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(items),
            # The same products as ONNX Runtime's: the patch embedding's convolution stays fp32 too.
            ignored_scope=nncf.IgnoredScope(names=ignored, types=["Convolution"]),
        )


def import_nncf() -> tuple[Any, Any]:
    """(openvino, nncf), or MissingDependencyError naming the int8 extra when either is missing or too old."""
    try:
        import openvino

        with _captured_output():  # importing NNCF imports torch, which may warn that there is no CUDA
            import nncf
    except ImportError as err:
        raise MissingDependencyError(
            f"--precision int8 for OpenVINO needs NNCF and OpenVINO ({err.name} is not installed): {INT8_EXTRA}"
        ) from err
    for name, minimum in (("nncf", MIN_NNCF), ("openvino", MIN_OPENVINO)):
        found = metadata.version(name)
        if _release(found) < minimum:
            raise MissingDependencyError(
                f"--precision int8 for OpenVINO needs {name} >= {'.'.join(map(str, minimum))}, found {found}: {INT8_EXTRA}"
            )
    return openvino, nncf


def _release(version: str) -> tuple[int, ...]:
    """'2026.4.1' -> (2026, 4): a version's major and minor numbers ((0, 0) when it does not start with them)."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    """onnxruntime.quantization warns on the root logger that the graph was not pre-processed (its
    optimiser would rename the nodes `nodes_to_exclude` names, so it is skipped on purpose): hide that."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@contextlib.contextmanager
def _captured_output() -> Iterator[None]:
    """Whatever is printed to stdout or stderr inside the block is dropped (a raised error still propagates)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
