"""ToMe model -> fixed-shape ONNX file with torch's default (torch.export-based) exporter."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from tome_deploy.artifact.formulations import MergeFormulation, formulation_named, get_formulation
from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.onnx_file import external_data_files, external_data_path, load_onnx
from tome_deploy.artifact.spec import EXPORT_SPEC, ExportSpec
from tome_deploy.core.merge import ADD_ROWS_OVERLOAD, DESTINATION_ROWS_OVERLOAD, GATHER_TOKENS_OVERLOAD
from tome_deploy.core.tracing import onnx_export_tracing
from tome_deploy.errors import ExportError, InvalidInputError, MissingDependencyError
from tome_deploy.output_files import StagedOutput, check_output_path


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: ToMeMetadata
    seconds: float


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints progress and warnings; keep stdout clean for --json and stderr readable."""
    sink = io.StringIO()
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield sink
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def explicit_attention(model: torch.nn.Module):
    """Trace timm's own attention modules, such as pooling heads, as MatMul/Softmax (their non-fused path;
    the ToMe blocks' core.attention follows core.tracing).

    The exporter's SDPA decomposition reshapes the keys to a computed shape, which leaves ONNX shape
    inference with unknown dims along the whole attention path. Restores the modules' setting after.
    """
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    try:
        for module in fused:
            setattr(module, "fused_attn", False)  # noqa: B010 - a plain bool on a torch module
        yield
    finally:
        for module in fused:
            setattr(module, "fused_attn", True)  # noqa: B010


def _gather_tokens_node(x, index):
    """tome_deploy::gather_tokens as GatherND(batch_dims=1): [B, N, C], [B, K, 1] -> [B, K, C], shapes inferable."""
    from onnxscript import opset18 as op

    return op.GatherND(x, index, batch_dims=1)


def _destination_rows_node(destination):
    """tome_deploy::destination_rows: [B, r, 1] -> [B, r, 2] (image, row), the image index an exclusive CumSum
    of ones over the batch axis (four nodes, every shape inferable)."""
    from onnxscript import opset18 as op

    ones = op.Cast(op.Equal(destination, destination), to=7)  # [B, r, 1] int64 (TensorProto.INT64)
    image = op.CumSum(ones, op.Constant(value_int=0), exclusive=1)  # [B, r, 1]: 0 .. B-1
    return op.Concat(image, destination, axis=-1)


def _add_rows_node(x, src, rows):
    """tome_deploy::add_rows as ScatterND(reduction=add): whole rows, no index expanded over C."""
    from onnxscript import opset18 as op

    return op.ScatterND(x, rows, src, reduction="add")


def translation_table(merge: MergeFormulation | str) -> dict:
    """{torch op overload: onnxscript translation} for every custom op a ToMe model traces to: core.merge's
    ops, and those of the merge formulation (the plugin's fused op becomes one tome::TokenMerge node per block)."""
    table = {
        GATHER_TOKENS_OVERLOAD: _gather_tokens_node,
        DESTINATION_ROWS_OVERLOAD: _destination_rows_node,
        ADD_ROWS_OVERLOAD: _add_rows_node,
    }
    table.update(get_formulation(merge).onnx_translations())
    return table


def _symbolic_dims(model_proto, batch_axis: str) -> list[str]:
    """Names of every value whose shape has a symbolic dimension other than the batch axis."""
    values = list(model_proto.graph.input) + list(model_proto.graph.output) + list(model_proto.graph.value_info)
    offenders = []
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param != batch_axis:
                offenders.append(f"{value.name}:{dim.dim_param}")
    return offenders


def export_onnx(
    tome_model: torch.nn.Module,
    metadata: ToMeMetadata,
    output: str | Path,
    *,
    spec: ExportSpec = EXPORT_SPEC,
    external_data: bool = False,
) -> ExportResult:
    """Trace `tome_model` at metadata.input (a random input of its shape), write a checked ONNX file with the
    metadata attached.

    The weights go to an external-data file beside it (`write_onnx`) when they are over
    spec.single_file_max_weight_bytes, or always with `external_data`."""
    try:
        import onnx  # noqa: F401  (written and checked by write_onnx)
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise MissingDependencyError(
            f"ONNX export needs onnx and onnxscript: pip install onnx onnxscript ({err})"
        ) from err
    formulation = formulation_named(metadata.merge)
    spec.check_opset(metadata.opset)
    path = check_onnx_output(output)
    example_batch = metadata.example_batch
    spec.check_batch(example_batch)
    dynamic = metadata.batch is None
    # A dynamic dimension traced at size 1 would be specialised away; trace at 2 or more.
    example = torch.randn(2 if dynamic and example_batch == 1 else example_batch, *metadata.input.shape)
    dynamic_shapes = ({0: torch.export.Dim(spec.batch_axis_name, min=1, max=spec.max_batch)},) if dynamic else None

    start = time.perf_counter()
    tome_model = tome_model.eval()
    try:
        with (
            _quiet_exporter(),
            explicit_attention(tome_model),
            onnx_export_tracing(topk_ties=metadata.target != "tensorrt"),
            torch.inference_mode(False),
            torch.no_grad(),
        ):
            program = torch.onnx.export(
                tome_model,
                (example,),
                dynamo=True,
                opset_version=metadata.opset,
                input_names=[metadata.input.name],
                output_names=[spec.output_name],
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                custom_translation_table=translation_table(formulation),
            )
    except Exception as err:  # the exporter raises many private types
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"torch.onnx.export failed: {first_line}") from err

    model_proto = _model_proto(program)
    for key, value in metadata.to_props().items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    model_proto.producer_name = "tome-deploy"
    model_proto.producer_version = metadata.tool_version
    model_proto.doc_string = f"ToMe {metadata.model}, r per layer {metadata.r_effective}, merge={metadata.merge}"
    # The exporter annotates every value with its traced shape; ONNX's own re-inference loses some
    # Reshape targets, so the static-shape promise is checked on the exporter's annotations.
    offenders = _symbolic_dims(model_proto, spec.batch_axis_name)
    if offenders:
        raise ExportError(f"the exported graph has symbolic dimensions besides the batch: {offenders[:5]}")
    path = write_onnx(model_proto, path, spec=spec, external_data=external_data)
    return ExportResult(path, metadata, time.perf_counter() - start)


def check_onnx_output(output: str | Path, inputs: Iterable[Optional[str | Path]] = ()) -> Path:
    """The -o of an ONNX export, checked (output_files' policy) with the external-data file beside it
    (`external_data_path`): that file is written or removed with the graph, so an existing one must be the
    one the existing graph at -o names (the previous version of this output); any other is refused, never
    overwritten."""
    path = check_output_path(output, inputs)
    data = external_data_path(path)
    if (data.exists() or data.is_symlink()) and not _names_file(path, data):  # a folder or FIFO never is
        raise InvalidInputError(
            f"{data} exists and is not the external data of {path}; an export to {path.name} writes its weights "
            f"there when they go to a file of their own: move {data.name} away, or choose another -o"
        )
    check_output_path(data, inputs)
    return path


def _names_file(graph: Path, data: Path) -> bool:
    """Whether the ONNX file at `graph` keeps its weights in `data`."""
    try:
        return data in external_data_files(load_onnx(graph), graph)
    except InvalidInputError:  # no graph there, not ONNX, or external data elsewhere or missing
        return False


def write_onnx(
    model_proto, output: Path, *, spec: ExportSpec = EXPORT_SPEC, external_data: bool = False, check: bool = True
) -> Path:
    """Write `model_proto` at `output` (checked by `check_onnx_output`) and, with `check`, check the files
    written with the ONNX checker and strict shape inference; all or nothing (output_files.StagedOutput).

    A model whose weights are over spec.single_file_max_weight_bytes (protobuf cannot hold 2 GiB), or any
    with `external_data`, is written as a pair: the graph at `output` and every tensor of at least
    spec.external_tensor_min_bytes in ONE file `external_data_path(output)`, named by a relative location
    (ONNX's external-data layout). Writing the pair moves the weights out of `model_proto`. A single-file
    model replaces a previous pair's data file by removing it."""
    external = external_data or _weight_bytes(model_proto) > spec.single_file_max_weight_bytes
    with StagedOutput(output, companions=[external_data_path(output)]) as staged:
        try:
            if external:
                _move_weights_out(model_proto, external_data_path(staged.temp), spec.external_tensor_min_bytes)
            staged.temp.write_bytes(model_proto.SerializeToString())
        except OSError as err:
            raise InvalidInputError(f"cannot write {output} ({err.strerror or err}); choose another -o path") from err
        if check:
            _check_written(staged.temp)
        return staged.commit()


def _weight_bytes(model_proto) -> int:
    """The bytes of the graph's initializers, from their shapes and types. Not ModelProto.ByteSize(), which
    serializes the whole model to count it: several times the weights in memory for a 2.5 GB ViT-H."""
    from onnx.helper import tensor_dtype_to_np_dtype

    return sum(
        math.prod(tensor.dims) * tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        for tensor in model_proto.graph.initializer
    )


def _move_weights_out(model_proto, data: Path, min_bytes: int) -> None:
    """Append every initializer of at least `min_bytes` to the new file `data` and make it name that file
    (its relative location and byte range). onnx.save_model does the same but first refuses a location that
    exists relative to the working directory, which may be the previous version of this very output."""
    from onnx.external_data_helper import set_external_data

    with open(data, "xb") as stream:
        for tensor in model_proto.graph.initializer:
            raw = tensor.raw_data  # a copy of one tensor's bytes
            if len(raw) >= min_bytes:
                set_external_data(tensor, data.name, stream.tell(), len(raw))
                stream.write(raw)
                tensor.ClearField("raw_data")


def _check_written(path: Path) -> None:
    """The ONNX checker and strict shape inference on the files at `path` (which may name external data),
    not on the in-memory model: a message of 2 GiB or more cannot be serialized for the checker."""
    import onnx

    inferred = path.with_name(f".{path.name}.inferred")
    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(inferred), strict_mode=True)
    except Exception as err:
        raise ExportError(f"the exported graph fails the ONNX checker: {str(err).splitlines()[0]}") from err
    finally:
        inferred.unlink(missing_ok=True)


def export_plain(
    model: torch.nn.Module,
    metadata: ToMeMetadata,
    output: str | Path,
    *,
    spec: ExportSpec = EXPORT_SPEC,
    external_data: bool = False,
) -> Path:
    """The baseline a user has without ToMe: torch.onnx.export of the unpatched model as it is (its own
    attention kernels, no tome-deploy rewriting), same input, batch and opset as `metadata`; written as
    `write_onnx` writes (external data above the same size), without the checks an export of ours gets."""
    dynamic = metadata.batch is None
    example = torch.randn(max(2 if dynamic else 1, metadata.example_batch), *metadata.input.shape)
    dynamic_shapes = ({0: torch.export.Dim(spec.batch_axis_name, min=1, max=spec.max_batch)},) if dynamic else None
    try:
        with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                model.eval(),
                (example,),
                dynamo=True,
                opset_version=metadata.opset,
                verbose=False,
                input_names=[metadata.input.name],
                output_names=[spec.output_name],
                dynamic_shapes=dynamic_shapes,
            )
    except Exception as err:  # the exporter raises many private types
        raise ExportError(
            f"torch.onnx.export of the plain model failed: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        ) from err
    path = check_onnx_output(output)
    return write_onnx(_model_proto(program), path, spec=spec, external_data=external_data, check=False)


def _model_proto(program):
    """The ONNX model of what torch.onnx.export returned (an ONNXProgram; None only from the legacy exporter)."""
    if program is None:
        raise ExportError("torch.onnx.export returned no program; tome-deploy exports with dynamo=True")
    return program.model_proto
