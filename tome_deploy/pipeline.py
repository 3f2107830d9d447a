"""The export and validation jobs as library calls; the command-line tools are thin shells over these."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .errors import InvalidInputError, ScheduleError
from .loading import LoadedModel, load_model, weights_fingerprint
from .merge import MergeFormulation
from .onnx_export import ExportResult, build_metadata, export_onnx, read_metadata
from .output_files import check_output_path
from .patch import apply_tome
from .schedule import RSpec, Schedule
from .spec import EXPORT_SPEC, ToMeMetadata
from .target import SpeedupChoice, speedup_choice_for_model
from .throughput import Timing, time_interleaved
from .validation import ValidationReport, validate_onnx

Say = Callable[[str], None]


def _silent(_: str) -> None:
    pass


@dataclass
class ExportOutcome:
    loaded: LoadedModel
    schedule: Schedule
    export: ExportResult
    clamp_warnings: list[str]
    validation: Optional[ValidationReport] = None
    timings: Optional[dict[str, Timing]] = None
    target: Optional[SpeedupChoice] = None  # set when the schedule came from a speedup target

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
    merge: MergeFormulation = "scatter",
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
    say: Say = _silent,
) -> ExportOutcome:
    """Load -> patch -> export -> (validate) -> (time against the unmerged export).

    target_speedup: instead of `r`, use the smallest constant r whose theoretical (FLOPs) speedup reaches
    it (`target.schedule_for_speedup`); raises ScheduleError when no schedule can.
    """
    EXPORT_SPEC.check_opset(opset)
    if batch_size < 1:
        raise InvalidInputError(f"--batch-size must be at least 1, got {batch_size}")
    output = check_output_path(output, inputs=(model, checkpoint))
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
        batch=str(batch_size) if static_batch else "dynamic",
        example_batch=batch_size,
    )
    say(f"Exporting ONNX (opset {opset}, merge={merge}, batch {metadata.batch}) ...")
    result = export_onnx(tome, metadata, output)
    say(f"  wrote {result.path} in {result.seconds:.1f} s")
    outcome = ExportOutcome(loaded, schedule, result, clamp_warnings, target=choice)
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
        baseline, schedule, _ = patch_with_schedule(loaded.model, 0, metadata.merge, strict=False)
        base_meta = build_metadata(baseline, schedule, 0, arch=metadata.model, weights=metadata.weights,
                                   weights_sha256=metadata.weights_sha256, merge=metadata.merge, opset=metadata.opset,
                                   batch=metadata.batch, example_batch=batch)
        say("Exporting the unmerged model for a side-by-side timing ...")
        base_path = export_onnx(baseline, base_meta, Path(folder) / "unmerged.onnx").path
        say(f"Timing both in ONNX Runtime (CPU, batch {batch}, interleaved) ...")
        return time_interleaved({"unmerged": base_path, "tome": tome_path}, metadata.input_name,
                                metadata.input_size, batch)


def validate_model(
    model: str,
    onnx_path: str | Path,
    *,
    arch: Optional[str] = None,
    checkpoint: Optional[str] = None,
    pretrained: bool = False,
    trust_pickle: bool = False,
    seed: Optional[int] = None,
    batch_sizes: Optional[Sequence[int]] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    say: Say = _silent,
) -> tuple[ToMeMetadata, ValidationReport]:
    """Rebuild the PyTorch ToMe model an ONNX file was exported from and compare the two."""
    metadata = read_metadata(onnx_path)
    if metadata is None:
        raise InvalidInputError(f"{onnx_path} carries no tome-deploy metadata; validate files written by tome-export")
    say(f"Loading {model} ...")
    loaded = load_model(model, arch=arch, checkpoint=checkpoint, pretrained=pretrained,
                        img_size=metadata.input_size[-1], trust_pickle=trust_pickle,
                        seed=seed if seed is not None else 0)
    if weights_fingerprint(loaded.model) != metadata.weights_sha256:
        raise InvalidInputError(
            f"the weights of {model} ({loaded.weights}) differ from those {onnx_path} was exported from "
            f"({metadata.weights}); pass the same model, --checkpoint and --seed as for tome-export"
        )
    try:
        tome, _ = apply_tome(loaded.model, list(metadata.r_effective), metadata.merge, strict=True)
    except ScheduleError as err:
        raise InvalidInputError(f"{onnx_path} was exported for another architecture: {err}") from err
    if batch_sizes and metadata.batch != "dynamic" and any(b != int(metadata.batch) for b in batch_sizes):
        raise InvalidInputError(f"{onnx_path} has a fixed batch of {metadata.batch}; validate at that batch size only")
    say("Validating ONNX Runtime (CPU) against PyTorch ...")
    return metadata, validate_onnx(tome, onnx_path, metadata, batch_sizes=batch_sizes, atol=atol, rtol=rtol)
