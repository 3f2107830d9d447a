"""ToMe model -> fixed-shape ONNX file with torch's default (torch.export-based) exporter."""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from tome_deploy.artifact.formulations import MergeFormulation, formulation_named, get_formulation
from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.spec import EXPORT_SPEC, ExportSpec
from tome_deploy.core.merge import ADD_ROWS_OVERLOAD, DESTINATION_ROWS_OVERLOAD, GATHER_TOKENS_OVERLOAD
from tome_deploy.core.tracing import onnx_export_tracing
from tome_deploy.errors import ExportError, MissingDependencyError
from tome_deploy.output_files import check_output_path, write_atomically


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
) -> ExportResult:
    """Trace `tome_model` at metadata.input (a random input of its shape), write a checked ONNX file with the metadata attached."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise MissingDependencyError(
            f"ONNX export needs onnx and onnxscript: pip install onnx onnxscript ({err})"
        ) from err
    formulation = formulation_named(metadata.merge)
    spec.check_opset(metadata.opset)
    path = check_output_path(output)
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
    try:
        onnx.checker.check_model(model_proto, full_check=True)
        onnx.shape_inference.infer_shapes(model_proto, strict_mode=True)
    except Exception as err:
        raise ExportError(f"the exported graph fails the ONNX checker: {str(err).splitlines()[0]}") from err
    # The exporter annotates every value with its traced shape; ONNX's own re-inference loses some
    # Reshape targets, so the static-shape promise is checked on the exporter's annotations.
    offenders = _symbolic_dims(model_proto, spec.batch_axis_name)
    if offenders:
        raise ExportError(f"the exported graph has symbolic dimensions besides the batch: {offenders[:5]}")

    path = write_atomically(path, lambda stream: stream.write(model_proto.SerializeToString()))
    return ExportResult(path, metadata, time.perf_counter() - start)


def export_plain(
    model: torch.nn.Module, metadata: ToMeMetadata, output: str | Path, *, spec: ExportSpec = EXPORT_SPEC
) -> Path:
    """The baseline a user has without ToMe: torch.onnx.export of the unpatched model as it is (its own
    attention kernels, no tome-deploy rewriting), same input, batch and opset as `metadata`."""
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
    path = check_output_path(output)
    model_proto = _model_proto(program)
    return write_atomically(path, lambda stream: stream.write(model_proto.SerializeToString()))


def _model_proto(program):
    """The ONNX model of what torch.onnx.export returned (an ONNXProgram; None only from the legacy exporter)."""
    if program is None:
        raise ExportError("torch.onnx.export returned no program; tome-deploy exports with dynamo=True")
    return program.model_proto
