"""What a served file is: its tensors, batch and ToMe metadata, read once when serving starts.

A served model is what tome-serve and the Triton repository writer know of one file: a tome-deploy ONNX
export, an OpenVINO IR (.xml, its weights in the .bin next to it) or a TensorRT engine, whose formats the
`tome_deploy.artifact` package (and for an IR, OpenVINO) reads. The runner that
executes it comes from `tome_deploy.runtime.factory.open_runner`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from tome_deploy.artifact.input_spec import AXES
from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.onnx_file import external_data_files, load_onnx, tome_metadata
from tome_deploy.artifact.sidecar import ENGINE_SUFFIXES
from tome_deploy.artifact.spec import OPENVINO_IR_SUFFIX
from tome_deploy.errors import InvalidInputError
from tome_deploy.input_files import check_input_file
from tome_deploy.runtime.base import Runner
from tome_deploy.serving.kserve import TensorSpec, datatype_of

ONNX_SUFFIXES = (".onnx",)


@dataclass(frozen=True)
class ServedModel:
    path: Path
    kind: str  # "onnx", "openvino_ir" or "engine"
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    metadata: ToMeMetadata
    max_batch: Optional[int] = None  # most rows one call takes (an engine's profile); None: no limit
    engine_backend: Optional[str] = None  # engines: "tensorrt" or "tensorrt-rtx", from the sidecar
    data_files: tuple[Path, ...] = ()  # ONNX: the external-data file(s) beside `path` that hold its weights

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch every call must have (a --static-batch export), or None when it is dynamic."""
        first = self.inputs[0].shape[0]
        return None if first < 0 else first

    @property
    def batch_limit(self) -> Optional[int]:
        """The most rows one model call may have, or None when any batch runs."""
        return self.fixed_batch or self.max_batch

    @property
    def triton_platform(self) -> str:
        """Triton's name for what runs this file (a platform, or for an IR the OpenVINO backend)."""
        return {"onnx": "onnxruntime_onnx", "engine": "tensorrt_plan", "openvino_ir": "openvino"}[self.kind]

    @property
    def triton_runs_on(self) -> dict[str, str]:
        """The ModelConfig field that picks Triton's backend for this file."""
        key = "backend" if self.kind == "openvino_ir" else "platform"
        return {key: self.triton_platform}

    @property
    def model_input(self) -> TensorSpec:
        """The one input tensor, [batch, *metadata.input.shape] (checked when the file was read)."""
        return self.inputs[0]

    @property
    def num_classes(self) -> int:
        return self.outputs[0].shape[-1]


def read_served_model(path: str | Path) -> ServedModel:
    path = Path(path).expanduser()
    if not path.exists():
        raise InvalidInputError(f"no such artifact: {path}; pass an ONNX file written by tome-export (or an engine)")
    check_input_file(path, "artifact")  # a FIFO or device is refused before it is opened
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return _checked_metadata(_read_onnx(path))
    if suffix in ENGINE_SUFFIXES:
        return _checked_metadata(_read_engine(path))
    if suffix == OPENVINO_IR_SUFFIX:
        return _checked_metadata(_read_ir(path))
    raise InvalidInputError(
        f"{path} is neither an ONNX file ({', '.join(ONNX_SUFFIXES)}), an OpenVINO IR ({OPENVINO_IR_SUFFIX}) nor an "
        f"engine ({', '.join(ENGINE_SUFFIXES)}); pass a tome-export output"
    )


def run_padded(runner: Runner, served_model: ServedModel, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a batch; a fixed-batch model gets zero rows appended up to its batch, and they are dropped again."""
    rows = len(next(iter(feed.values())))
    fixed = served_model.fixed_batch
    if fixed is None or rows == fixed:
        return runner.infer(feed)
    padded = {
        name: np.concatenate([value, np.zeros((fixed - rows, *value.shape[1:]), value.dtype)])
        for name, value in feed.items()
    }
    return {name: value[:rows] for name, value in runner.infer(padded).items()}


def _read_onnx(path: Path) -> ServedModel:
    proto = load_onnx(path)
    metadata = tome_metadata(proto, path)
    if metadata is None:
        raise InvalidInputError(
            f"{path} has no tome-deploy metadata (tome.* properties); export it with tome-export first"
        )
    initializers = {init.name for init in proto.graph.initializer}
    inputs = tuple(_onnx_tensor(value) for value in proto.graph.input if value.name not in initializers)
    outputs = tuple(_onnx_tensor(value) for value in proto.graph.output)
    if len(inputs) != 1 or len(outputs) != 1 or len(outputs[0].shape) != 2:
        raise InvalidInputError(
            f"{path} is not a model with one [batch, ...] input and one [batch, classes] output; serve a tome-export output"
        )
    # tome.input decides what /classify resizes to and what /infer accepts; it must be the graph's own input,
    # so a damaged or crafted value cannot choose what a request allocates.
    metadata.check_input(inputs[0].name, list(inputs[0].shape[1:]), str(path))
    return ServedModel(
        path, "onnx", _with_axes(inputs, metadata), outputs, metadata, data_files=external_data_files(proto, path)
    )


def _read_ir(path: Path) -> ServedModel:
    """An OpenVINO IR written by tome-export: its tensors from OpenVINO, its ToMe metadata from rt_info."""
    from tome_deploy.runtime.openvino import import_openvino, read_ir_metadata

    metadata = ToMeMetadata.from_props(read_ir_metadata(path), str(path))
    if metadata is None:
        raise InvalidInputError(
            f"{path} has no tome-deploy metadata (rt_info tome_deploy); export it with tome-export -o NAME.xml"
        )
    model = import_openvino().Core().read_model(str(path))
    inputs = tuple(_ir_tensor(port) for port in model.inputs)
    outputs = tuple(_ir_tensor(port) for port in model.outputs)
    if len(inputs) != 1 or len(outputs) != 1 or len(outputs[0].shape) != 2:
        raise InvalidInputError(
            f"{path} is not a model with one [batch, ...] input and one [batch, classes] output; serve a tome-export output"
        )
    metadata.check_input(inputs[0].name, list(inputs[0].shape[1:]), str(path))
    return ServedModel(path, "openvino_ir", _with_axes(inputs, metadata), outputs, metadata)


def _ir_tensor(port) -> TensorSpec:
    """An IR input or output: its name, float32 (exports take and give float32), its shape (-1: dynamic)."""
    shape = tuple(dim.get_length() if dim.is_static else -1 for dim in port.get_partial_shape())
    return TensorSpec(port.get_any_name(), "FP32", shape)


def _with_axes(inputs: tuple[TensorSpec, ...], metadata: ToMeMetadata) -> tuple[TensorSpec, ...]:
    """The model input (checked against the input spec) with the names of its axes, for request errors."""
    return (dataclasses.replace(inputs[0], axes=AXES[metadata.input.kind]),)


def _checked_metadata(served_model: ServedModel) -> ServedModel:
    """The ToMe metadata must describe the graph it is served with, or the server would report (and a client
    act on) a model it is not running (tome.input, checked by the readers against the model's input, decides
    what a request may allocate); tome.output_name must be the graph's output; an ONNX file's tome.batch
    (null: dynamic) must be its graph's batch axis. An engine's batch comes from its build profile, which may
    fix the batch of a dynamic export, so only its names count."""
    meta, name = served_model.metadata, served_model.path.name
    output = served_model.outputs[0].name
    if meta.output_name != output:
        raise InvalidInputError(
            f"{name}: tome.output_name {meta.output_name[:64]!r} is not the model's output ({output!r}); "
            "the metadata is damaged: re-export the model with tome-export"
        )
    if served_model.kind == "onnx" and meta.batch != served_model.fixed_batch:
        described = "a dynamic batch" if meta.batch is None else f"a batch of {meta.batch}"
        graph = "dynamic" if served_model.fixed_batch is None else f"fixed at {served_model.fixed_batch}"
        raise InvalidInputError(
            f"{name}: tome.batch says {described} but the graph's batch axis is {graph}; "
            "the metadata is damaged: re-export the model with tome-export"
        )
    return served_model


def _onnx_tensor(value) -> TensorSpec:
    import onnx

    tensor_type = value.type.tensor_type
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    shape = tuple(dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim)
    return TensorSpec(value.name, datatype_of(dtype), shape)


def _read_engine(path: Path) -> ServedModel:
    """An engine is described by its tome-build sidecar alone (tensors, profile, ToMe metadata), so it can
    be served on a machine that does not have the ONNX file it was built from."""
    from tome_deploy.artifact.sidecar import read_sidecar

    sidecar = read_sidecar(path)
    if sidecar.tome is None:
        raise InvalidInputError(
            f"{path.name} was built from an ONNX file without tome-deploy metadata; "
            "build the engine from a tome-export output"
        )
    sidecar.tome.check_input(sidecar.input_name, sidecar.input_shape, str(path))
    profile = sidecar.profiles[0]
    if profile.min > 1 and profile.min != profile.max:
        raise InvalidInputError(
            f"{path.name}'s profile starts at batch {profile.min}; rebuild with tome-build --min-batch 1 so single requests can run"
        )
    batch = profile.max if profile.min == profile.max else -1
    # Exports take and give float32 (fp16 ones cast inside), and the runner returns float32.
    inputs = _with_axes((TensorSpec(sidecar.input_name, "FP32", (batch, *sidecar.input_shape)),), sidecar.tome)
    outputs = (TensorSpec(sidecar.output_name, "FP32", (batch, *sidecar.output_shape)),)
    return ServedModel(
        path, "engine", inputs, outputs, sidecar.tome, max_batch=profile.max, engine_backend=sidecar.backend
    )
