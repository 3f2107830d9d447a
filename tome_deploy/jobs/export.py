"""The export job as one library call (load -> patch -> export -> validate -> measure); `tome-export` is a thin shell over it."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.spec import EXPORT_SPEC, MergeFormulation, merge_for_target
from tome_deploy.core.schedule import RSpec, Schedule
from tome_deploy.core.speedup import SpeedupChoice
from tome_deploy.errors import InvalidInputError
from tome_deploy.jobs.progress import Say, silent
from tome_deploy.models.loading.dispatch import LoadedModel, load_model
from tome_deploy.models.loading.source import ModelSource
from tome_deploy.models.loading.fingerprint import weights_fingerprint
from tome_deploy.models.patch import apply_tome, speedup_choice_for_model
from tome_deploy.onnx_export.export import ExportResult, export_onnx
from tome_deploy.onnx_export.metadata import build_metadata
from tome_deploy.onnx_export.precision import check_precision, with_precision
from tome_deploy.output_files import check_output_path
from tome_deploy.runtime.throughput import Timing, time_interleaved
from tome_deploy.token_merge.ort_op import require_extensions
from tome_deploy.validation.parity import ValidationReport, validate_onnx


@dataclass
class ExportOutcome:
    loaded: LoadedModel
    schedule: Schedule
    export: ExportResult
    validation: Optional[ValidationReport] = None
    timings: Optional[dict[str, Timing]] = None
    target: Optional[SpeedupChoice] = None  # set when the schedule came from a speedup target

    @property
    def measured_speedup(self) -> Optional[float]:
        if not self.timings:
            return None
        return self.timings["unmerged"].median_s / self.timings["tome"].median_s


def export_model(
    source: ModelSource | str,
    output: str | Path,
    *,
    r: RSpec = 16,
    merge: Optional[MergeFormulation] = None,
    target: str = "onnxruntime",
    precision: str = "fp32",
    opset: int = EXPORT_SPEC.default_opset,
    batch_size: int = 1,
    static_batch: bool = False,
    strict: bool = False,
    validate: bool = True,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    measure: bool = False,
    target_speedup: Optional[float] = None,
    say: Say = silent,
) -> ExportOutcome:
    """Load -> patch -> export -> (validate) -> (time against the unmerged export).

    source: where the model comes from (a ModelSource; a plain name or path means its defaults).
    Clamping of r is reported as data: `outcome.schedule.clamp_note()` (strict=True raises instead).

    target_speedup: instead of `r`, use the smallest constant r whose theoretical (FLOPs) speedup reaches
    it (`target.schedule_for_speedup`); raises ScheduleError when no schedule can.
    merge: the formulation; None picks the one `target` runs best (scatter for ONNX Runtime, matmul for TensorRT).
    precision: fp32, or fp16 weights and activations with fp32 matching (`precision.with_precision`).
    """
    EXPORT_SPEC.check_opset(opset)
    merge = merge_for_target(merge, target)
    check_precision(precision)
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {batch_size}")
    if not isinstance(source, ModelSource):
        source = ModelSource(source)
    output = check_output_path(output, inputs=(source.name, source.checkpoint))
    if merge == "plugin" and (validate or measure):
        require_extensions()  # ONNX Runtime runs tome::TokenMerge only through it: fail before the export
    say(f"Loading {source.name} ...")
    loaded = load_model(source)
    say(f"  weights: {loaded.weights}")
    choice = None
    if target_speedup is not None:
        choice = speedup_choice_for_model(loaded.model, target_speedup, strict=strict)
        r = choice.r
        say(f"  {choice.line()}")
    tome, schedule = apply_tome(loaded.model, r, merge, strict=strict)
    metadata = build_metadata(
        tome, schedule, r,
        arch=loaded.arch or type(loaded.model).__name__,
        weights=loaded.weights,
        weights_sha256=weights_fingerprint(loaded.model),
        merge=merge,
        opset=opset,
        batch=str(batch_size) if static_batch else "dynamic",
        example_batch=batch_size,
        precision=precision,
        target=target,
    )
    tome = with_precision(tome, precision)
    say(f"Exporting ONNX (opset {opset}, merge={merge}, {precision}, batch {metadata.batch}) ...")
    result = export_onnx(tome, metadata, output)
    say(f"  wrote {result.path} in {result.seconds:.1f} s")
    outcome = ExportOutcome(loaded, schedule, result, target=choice)
    if validate:
        say("Validating ONNX Runtime (CPU) against PyTorch ...")
        outcome.validation = validate_onnx(tome, result.path, metadata, atol=atol, rtol=rtol)
    if measure:
        outcome.timings = measure_against_unmerged(loaded, result.path, metadata, say)
    return outcome


def measure_against_unmerged(loaded: LoadedModel, tome_path: Path, metadata: ToMeMetadata, say: Say) -> dict[str, Timing]:
    """Export the same weights without merging and time both in ONNX Runtime, interleaved."""
    batch = int(metadata.extra.get("example_batch", 1))
    with tempfile.TemporaryDirectory() as folder:
        baseline, schedule = apply_tome(loaded.model, 0, metadata.merge)
        base_meta = build_metadata(baseline, schedule, 0, arch=metadata.model, weights=metadata.weights,
                                   weights_sha256=metadata.weights_sha256, merge=metadata.merge, opset=metadata.opset,
                                   batch=metadata.batch, example_batch=batch, precision=metadata.precision,
                                   target=metadata.target)
        baseline = with_precision(baseline, metadata.precision)
        say("Exporting the unmerged model for a side-by-side timing ...")
        base_path = export_onnx(baseline, base_meta, Path(folder) / "unmerged.onnx").path
        say(f"Timing both in ONNX Runtime (CPU, batch {batch}, interleaved) ...")
        return time_interleaved({"unmerged": base_path, "tome": tome_path}, metadata.input_name,
                                metadata.input_size, batch)
