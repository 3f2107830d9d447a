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

from . import __version__
from .errors import ExportError, InvalidInputError, MissingDependencyError
from .flops import theoretical_speedup
from .output_files import check_output_path, write_atomically
from .patch import mlp_ratio
from .schedule import Schedule
from .spec import EXPORT_SPEC, MERGE_FORMULATIONS, ExportSpec, ToMeMetadata
from .token_merge.onnx_translation import custom_translation_table


@dataclass(frozen=True)
class ExportResult:
    path: Path
    metadata: ToMeMetadata
    seconds: float


def data_config(model: torch.nn.Module) -> dict:
    """Input size and normalisation, read from the model (timm's pretrained_cfg) as data."""
    from timm.data import resolve_data_config

    config = resolve_data_config(model=model)
    height, width = model.patch_embed.img_size
    return {
        "input_size": [int(model.patch_embed.proj.in_channels), int(height), int(width)],
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "interpolation": str(config.get("interpolation", "bicubic")),
        "crop_pct": float(config.get("crop_pct", 0.875)),
    }


def build_metadata(
    model: torch.nn.Module,
    schedule: Schedule,
    schedule_spec,
    *,
    arch: str,
    weights: str,
    weights_sha256: str,
    merge: str,
    opset: int,
    batch: str,
    example_batch: int,
    precision: str = "fp32",
    target: str = "onnxruntime",
) -> ToMeMetadata:
    return ToMeMetadata(
        tool_version=__version__,
        model=arch,
        weights=weights,
        weights_sha256=weights_sha256,
        merge=merge,
        opset=opset,
        batch=batch,
        schedule=list(schedule_spec) if isinstance(schedule_spec, (list, tuple)) else schedule_spec,
        r_requested=list(schedule.requested),
        r_effective=list(schedule.effective),
        tokens_per_layer=list(schedule.tokens),
        num_prefix_tokens=schedule.num_prefix,
        theoretical_speedup=round(theoretical_speedup(schedule.tokens, int(model.embed_dim), mlp_ratio(model)), 4),
        extra={"example_batch": example_batch},
        precision=precision,
        target=target,
        **data_config(model),
    )


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
    """Trace `tome_model` at metadata.input_size, write a checked ONNX file with the metadata attached."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    except ImportError as err:
        raise MissingDependencyError(f"ONNX export needs onnx and onnxscript: pip install onnx onnxscript ({err})") from err
    if metadata.merge not in MERGE_FORMULATIONS:
        raise InvalidInputError(f"unknown --merge {metadata.merge!r}; choose one of {', '.join(MERGE_FORMULATIONS)}")
    spec.check_opset(metadata.opset)
    path = check_output_path(output)
    example_batch = int(metadata.extra.get("example_batch", 1))
    if example_batch < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {example_batch}")
    dynamic = metadata.batch == "dynamic"
    example = torch.randn(example_batch, *metadata.input_size)
    # A dynamic dimension traced at size 1 would be specialised away; trace at 2 or more.
    if dynamic and example_batch == 1:
        example = torch.randn(2, *metadata.input_size)
    dynamic_shapes = ({0: torch.export.Dim(spec.batch_axis_name, min=1, max=4096)},) if dynamic else None

    start = time.perf_counter()
    tome_model = tome_model.eval()
    try:
        with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
            program = torch.onnx.export(
                tome_model,
                (example,),
                dynamo=True,
                opset_version=metadata.opset,
                input_names=[spec.input_name],
                output_names=[spec.output_name],
                dynamic_shapes=dynamic_shapes,
                verbose=False,
                # --merge plugin: the fused op becomes one tome::TokenMerge node per block
                custom_translation_table=custom_translation_table() if metadata.merge == "plugin" else None,
            )
    except Exception as err:  # the exporter raises many private types
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"torch.onnx.export failed: {first_line}") from err

    model_proto = program.model_proto
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


def load_onnx(path: str | Path):
    """An ONNX file's graph and metadata (external weights are not loaded); InvalidInputError when unreadable."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"no such ONNX file: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError, OSError, ...
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InvalidInputError(f"{path} is not a readable ONNX file ({detail}); pass a file written by tome-export") from err


def tome_metadata(model_proto) -> ToMeMetadata | None:
    """The ToMe metadata of a loaded ONNX model, or None when tome-export did not write it."""
    return ToMeMetadata.from_props({p.key: p.value for p in model_proto.metadata_props})


def read_metadata(path: str | Path) -> ToMeMetadata | None:
    """The ToMe metadata of an ONNX file, or None for a file that is not a tome-deploy export."""
    return tome_metadata(load_onnx(path))
