"""The export job as one library call (load -> patch -> export -> validate -> measure); `tome-export` is a thin shell over it."""

from __future__ import annotations

import dataclasses
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.spec import EXPORT_SPEC, MergeFormulation, merge_for_target
from tome_deploy.core.schedule import RSpec, Schedule
from tome_deploy.core.speedup import SpeedupChoice
from tome_deploy.jobs.progress import Say, silent
from tome_deploy.models.loading.dispatch import LoadedModel, load_model
from tome_deploy.models.loading.fingerprint import weights_fingerprint
from tome_deploy.models.patch import apply_tome, speedup_choice_for_model
from tome_deploy.onnx_export.export import ExportResult, export_onnx
from tome_deploy.onnx_export.metadata import build_metadata
from tome_deploy.onnx_export.precision import check_precision, with_precision
from tome_deploy.output_files import StagedOutput, check_outputs
from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner
from tome_deploy.runtime.throughput import Timing, time_interleaved
from tome_deploy.token_merge.ort_op import require_extensions
from tome_deploy.validation.parity import ValidationReport, validate_runners


@dataclass
class ExportOutcome:
    loaded: LoadedModel
    schedule: Schedule
    export: ExportResult
    clamp_warnings: list[str]
    validation: Optional[ValidationReport] = None
    timings: Optional[dict[str, Timing]] = None
    target: Optional[SpeedupChoice] = None  # set when the schedule came from a speedup target
    written: bool = True  # False when validation failed: the output path keeps what it held before

    @property
    def measured_speedup(self) -> Optional[float]:
        if not self.timings:
            return None
        return self.timings["unmerged"].median_s / self.timings["tome"].median_s


def patch_with_schedule(model, r: RSpec, merge: MergeFormulation, strict: bool) -> tuple[object, Schedule, list[str]]:
    """apply_tome, with clamping warnings collected so that the caller can show them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tome, schedule = apply_tome(model, r, merge, strict=strict)
    return tome, schedule, [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "clamped" in str(w.message)]


def export_model(
    model: str,
    output: str | Path,
    *,
    r: RSpec = 16,
    merge: Optional[MergeFormulation] = None,
    target: str = "onnxruntime",
    precision: str = "fp32",
    arch: Optional[str] = None,
    checkpoint: Optional[str] = None,
    pretrained: bool = False,
    img_size: Optional[int] = None,
    trust_pickle: bool = False,
    seed: int = 0,
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

    target_speedup: instead of `r`, use the smallest constant r whose theoretical (FLOPs) speedup reaches
    it (`target.schedule_for_speedup`); raises ScheduleError when no schedule can.
    merge: the formulation; None picks the one `target` runs best (scatter for ONNX Runtime, matmul for TensorRT).
    precision: fp32, or fp16 weights and activations with fp32 matching (`precision.with_precision`).
    The file is written next to `output` and moved onto it only when validation passes (or is skipped), so a
    failing export never replaces an existing file; `outcome.written` says whether it was installed.
    """
    EXPORT_SPEC.check_opset(opset)
    merge = merge_for_target(merge, target)
    check_precision(precision)
    EXPORT_SPEC.check_batch(batch_size)
    output = check_outputs({"-o": output}, inputs=(model, checkpoint))["-o"]
    if merge == "plugin" and (validate or measure):
        require_extensions()  # ONNX Runtime runs tome::TokenMerge only through it: fail before the export
    say(f"Loading {model} ...")
    loaded = load_model(model, arch=arch, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size,
                        trust_pickle=trust_pickle, seed=seed)
    say(f"  weights: {loaded.weights}")
    choice = None
    if target_speedup is not None:
        choice = speedup_choice_for_model(loaded.model, target_speedup, strict=strict)
        r = choice.r
        say(f"  {choice.line()}")
    tome, schedule, clamp_warnings = patch_with_schedule(loaded.model, r, merge, strict)
    for message in clamp_warnings:
        say(f"  warning: {message}")
    metadata = build_metadata(
        tome, schedule, r,
        arch=loaded.arch or type(loaded.model).__name__,
        weights=loaded.weights,
        weights_sha256=weights_fingerprint(loaded.model),
        merge=merge,
        opset=opset,
        batch=batch_size if static_batch else None,
        example_batch=batch_size,
        precision=precision,
        target=target,
    )
    tome = with_precision(tome, precision)
    say(f"Exporting ONNX (opset {opset}, merge={merge}, {precision}, batch {metadata.batch or 'dynamic'}) ...")
    with StagedOutput(output) as staged:
        result = export_onnx(tome, metadata, staged.temp)
        outcome = ExportOutcome(loaded, schedule, dataclasses.replace(result, path=output), clamp_warnings, target=choice)
        if validate:
            say("Validating ONNX Runtime (CPU) against PyTorch ...")
            outcome.validation = validate_runners(tome, [OnnxRuntimeRunner(staged.temp)], metadata, str(output),
                                                  atol=atol, rtol=rtol)
        outcome.written = outcome.validation is None or outcome.validation.passed
        if not outcome.written:
            say(f"  the export failed validation and was not written to {output} (an existing file there is kept)")
            return outcome
        staged.commit()
    say(f"  wrote {output} in {result.seconds:.1f} s")
    if measure:
        outcome.timings = measure_against_unmerged(loaded, outcome.export.path, metadata, say)
    return outcome


def measure_against_unmerged(loaded: LoadedModel, tome_path: Path, metadata: ToMeMetadata, say: Say) -> dict[str, Timing]:
    """Export the same weights without merging and time both in ONNX Runtime, interleaved."""
    batch = metadata.example_batch
    with tempfile.TemporaryDirectory() as folder:
        baseline, schedule, _ = patch_with_schedule(loaded.model, 0, metadata.merge, strict=False)
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
