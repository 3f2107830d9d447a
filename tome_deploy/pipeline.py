"""The export and validation jobs as library calls; the command-line tools are thin shells over these."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from .engine_sidecar import EngineSidecar, file_sha256, is_engine_file, read_sidecar
from .errors import InvalidInputError, ScheduleError
from .loading import LoadedModel, load_model, weights_fingerprint
from .merge import MergeFormulation
from .onnx_export import ExportResult, build_metadata, export_onnx, read_metadata
from .output_files import check_output_path
from .patch import apply_tome
from .polygraphy_reference import save_polygraphy_reference
from .precision import check_precision, with_precision
from .runners import OnnxRuntimeRunner, TensorRTRunner
from .schedule import RSpec, Schedule
from .spec import EXPORT_SPEC, ToMeMetadata, merge_for_target
from .target import SpeedupChoice, speedup_choice_for_model
from .throughput import Timing, time_interleaved
from .token_merge.ort_op import require_extensions
from .validation import ValidationReport, default_batch_sizes, validate_onnx, validate_runners


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
    say: Say = _silent,
) -> ExportOutcome:
    """Load -> patch -> export -> (validate) -> (time against the unmerged export).

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
    output = check_output_path(output, inputs=(model, checkpoint))
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
        batch=str(batch_size) if static_batch else "dynamic",
        example_batch=batch_size,
        precision=precision,
        target=target,
    )
    tome = with_precision(tome, precision)
    say(f"Exporting ONNX (opset {opset}, merge={merge}, {precision}, batch {metadata.batch}) ...")
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
                                   batch=metadata.batch, example_batch=batch, precision=metadata.precision,
                                   target=metadata.target)
        baseline = with_precision(baseline, metadata.precision)
        say("Exporting the unmerged model for a side-by-side timing ...")
        base_path = export_onnx(baseline, base_meta, Path(folder) / "unmerged.onnx").path
        say(f"Timing both in ONNX Runtime (CPU, batch {batch}, interleaved) ...")
        return time_interleaved({"unmerged": base_path, "tome": tome_path}, metadata.input_name,
                                metadata.input_size, batch)


def validate_model(
    model: str,
    artifact: str | Path,
    *,
    arch: Optional[str] = None,
    checkpoint: Optional[str] = None,
    pretrained: bool = False,
    trust_pickle: bool = False,
    seed: Optional[int] = None,
    batch_sizes: Optional[Sequence[int]] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    save_reference: Optional[str | Path] = None,
    say: Say = _silent,
) -> tuple[ToMeMetadata, ValidationReport]:
    """Rebuild the PyTorch ToMe model an ONNX file or engine came from and compare them.

    An engine (tome-build output) is compared with PyTorch and, when its ONNX file is still where the
    sidecar says, with ONNX Runtime too. save_reference: also write the PyTorch outputs in Polygraphy's format.
    """
    engine = is_engine_file(artifact)
    sidecar = read_sidecar(artifact) if engine else None
    metadata = _artifact_metadata(artifact, sidecar)
    if save_reference is not None:
        check_output_path(save_reference, inputs=(artifact,))
    say(f"Loading {model} ...")
    loaded = load_model(model, arch=arch, checkpoint=checkpoint, pretrained=pretrained,
                        img_size=metadata.input_size[-1], trust_pickle=trust_pickle,
                        seed=seed if seed is not None else 0)
    if weights_fingerprint(loaded.model) != metadata.weights_sha256:
        raise InvalidInputError(
            f"the weights of {model} ({loaded.weights}) differ from those {artifact} was exported from "
            f"({metadata.weights}); pass the same model, --checkpoint and --seed as for tome-export"
        )
    try:
        tome, _ = apply_tome(loaded.model, list(metadata.r_effective), metadata.merge, strict=True)
        tome = with_precision(tome, metadata.precision)
    except ScheduleError as err:
        raise InvalidInputError(f"{artifact} was exported for another architecture: {err}") from err
    if batch_sizes and metadata.batch != "dynamic" and any(b != int(metadata.batch) for b in batch_sizes):
        raise InvalidInputError(f"{artifact} has a fixed batch of {metadata.batch}; validate at that batch size only")
    if save_reference is not None:
        batch = int(metadata.batch) if metadata.batch != "dynamic" else 1
        outputs, inputs = save_polygraphy_reference(tome, metadata, save_reference, batch)
        tolerance = EXPORT_SPEC.tolerance(metadata.precision)
        onnx_file = sidecar.onnx_path if sidecar else artifact
        say(f"  wrote the PyTorch reference for Polygraphy: {outputs} (inputs: {inputs}); check with\n"
            f"    polygraphy run {onnx_file} --trt --load-inputs {inputs} --load-outputs {outputs} "
            f"--atol {tolerance.atol:g} --rtol {tolerance.rtol:g}")
    if not engine:
        say("Validating ONNX Runtime (CPU) against PyTorch ...")
        return metadata, validate_onnx(tome, artifact, metadata, batch_sizes=batch_sizes, atol=atol, rtol=rtol)
    candidates = [TensorRTRunner(artifact)]
    onnx_file = Path(sidecar.onnx_path)
    if onnx_file.is_file() and file_sha256(onnx_file) == sidecar.onnx_sha256:
        candidates.append(OnnxRuntimeRunner(onnx_file))
    else:
        say(f"  note: the engine's ONNX file {onnx_file} is gone or changed; comparing the engine with PyTorch only")
    profile = sidecar.profiles[0]
    batches = batch_sizes or sorted({min(max(b, profile.min), profile.max) for b in default_batch_sizes(metadata)})
    say(f"Validating {' and '.join(c.name for c in candidates)} against PyTorch ...")
    return metadata, validate_runners(tome, candidates, metadata, str(artifact), batch_sizes=batches, atol=atol, rtol=rtol)


def _artifact_metadata(artifact: str | Path, sidecar: Optional[EngineSidecar]) -> ToMeMetadata:
    if sidecar is None:
        metadata = read_metadata(artifact)
    else:
        metadata = ToMeMetadata(**sidecar.tome) if sidecar.tome else None
    if metadata is None:
        raise InvalidInputError(f"{artifact} carries no tome-deploy metadata; validate files written by tome-export / tome-build")
    return metadata
