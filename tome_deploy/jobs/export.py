"""The export job as one library call (load -> patch -> export -> validate -> measure); `tome-export` is a thin shell over it."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from tome_deploy.artifact.formulations import MergeFormulation, merge_for_target
from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.onnx_file import external_data_path
from tome_deploy.artifact.spec import EXPORT_SPEC, OPENVINO_IR_SUFFIX, REDUCED_PRECISIONS
from tome_deploy.artifact.tune_file import TunedSchedule, read_tune_file
from tome_deploy.core.schedule import RSpec, Schedule
from tome_deploy.core.speedup import (
    SEARCH_STRIDES,
    ScheduleSearch,
    SpeedupChoice,
    every_block,
    largest_r,
    search_measured_schedule,
    sparse_schedule,
    speedup_choice,
    stride_label,
    stride_speedup,
)
from tome_deploy.errors import InvalidInputError, ScheduleError
from tome_deploy.jobs.int8 import CalibrationSet, quantize_to_artifact, read_calibration_set
from tome_deploy.jobs.progress import Say, silent
from tome_deploy.models.adapter import describe
from tome_deploy.models.loading.dispatch import LoadedModel, load_model
from tome_deploy.models.loading.fingerprint import weights_fingerprint
from tome_deploy.models.loading.source import ModelSource
from tome_deploy.models.patch import apply_tome
from tome_deploy.onnx_export.export import ExportResult, check_onnx_output, export_onnx, export_plain
from tome_deploy.onnx_export.metadata import build_metadata
from tome_deploy.onnx_export.precision import with_precision
from tome_deploy.onnx_export.quantize import check_int8_options, import_nncf
from tome_deploy.output_files import StagedOutput, check_outputs, companion_path
from tome_deploy.runtime.factory import RUNTIME_LABELS, check_runtime, open_runner
from tome_deploy.runtime.openvino import IR_WEIGHTS_SUFFIX
from tome_deploy.runtime.throughput import Timing, time_interleaved
from tome_deploy.validation.compare import check_tolerances
from tome_deploy.validation.merge_agreement import match_twin
from tome_deploy.validation.parity import ValidationReport, validate_runners


@dataclass
class ExportOutcome:
    loaded: LoadedModel
    schedule: Schedule
    export: ExportResult
    validation: Optional[ValidationReport] = None
    timings: Optional[dict[str, Timing]] = None
    target: Optional[SpeedupChoice] = None  # set when the schedule came from a speedup target
    search: Optional[ScheduleSearch] = None  # the measured search that target started
    runtime: str = "onnxruntime"  # where validation and timing ran
    written: bool = True  # False when validation failed: the output path keeps what it held before
    external_data: Optional[Path] = None  # the file beside the ONNX graph that holds its weights, if any

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
    merge: MergeFormulation | str | None = None,
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
    runtime: str = "onnxruntime",
    sparse: bool = True,
    schedule_from: str | Path | None = None,
    external_data: bool = False,
    data: str | Path | None = None,
    labels: str | Path | None = None,
    quantization: Optional[str] = None,
    say: Say = silent,
) -> ExportOutcome:
    """Load -> patch -> export -> (validate) -> (time against the unmerged export).

    source: where the model comes from (a ModelSource; a plain name or path means its defaults).
    Clamping of r is reported as data: `outcome.schedule.clamp_note()` (strict=True raises instead).

    target_speedup: instead of `r`, start at the smallest constant r whose theoretical (FLOPs) speedup
    reaches it (`speedup.schedule_for_speedup`), then measure from that r upwards in `runtime` at
    `batch_size` until the measured speedup reaches the target, and export the schedule that reaches it
    with the least merging (`speedup.search_measured_schedule`); raises ScheduleError when the FLOPs cannot
    reach it or when no measured schedule does (naming the best measured ratio).
    sparse: after constant r, also search r in every 2nd and every 3rd block (`speedup.sparse_schedule`:
    the fixed cost of matching paid in fewer blocks), over the r that merge less than the constant r that
    reached the target; False searches constant r only.
    runtime: the CPU runtime that validates and times the export (onnxruntime or openvino).
    merge: the formulation (artifact/formulations.py) or its name; None picks the one `target` runs best
    (spec.TARGET_DEFAULT_MERGE: scatter for ONNX Runtime, matmul for TensorRT).
    precision: fp32, or fp16 weights and activations with fp32 matching (`precision.with_precision`); bf16,
    an OpenVINO IR whose transformer MatMuls compute in bf16 and whose matching stays f32 (needs
    runtime="openvino" and an output ending in .xml); int8, the runtime's quantizer on the fp32 export
    (`quantize_artifact`). An output ending in .xml is an OpenVINO IR (.xml + .bin) for runtime="openvino".
    schedule_from: a tune.json of tome-tune: instead of `r`, export its chosen r per layer and record the
    quality it measured (ToMeMetadata.quality); refused (TuneFileError) when damaged, tuned for other
    weights, or for another number of blocks.
    external_data: write the weights to `output`.data beside the graph even when the model fits in one file
    (a model with weights over spec.single_file_max_weight_bytes always is written so); the graph and its
    data file are written, validated and committed together (onnx_export.export.write_onnx).
    data, labels, quantization: int8 only. `data` is a folder of calibration images (read as tome-tune reads
    it, with its class names in `labels`; jobs/int8.py); `quantization` is "dynamic" or "static", by default
    static with `data` and dynamic without it (ONNX Runtime; OpenVINO's NNCF is static only).
    InvalidInputError for static without `data`.
    """
    EXPORT_SPEC.check_opset(opset)
    formulation = merge_for_target(merge, target)
    check_runtime(runtime)
    EXPORT_SPEC.check_precision(precision, runtime, output, target)
    check_tolerances(atol, rtol)
    EXPORT_SPEC.check_batch(batch_size)
    if not isinstance(source, ModelSource):
        source = ModelSource(source)
    output = check_artifact_output(output, inputs=(source.name, source.checkpoint))
    if precision in REDUCED_PRECISIONS and target_speedup is not None:
        raise InvalidInputError(
            f"--target-speedup searches with fp32 exports; for --precision {precision} pass --r (or a tune.json) "
            "and --measure"
        )
    if schedule_from is not None and target_speedup is not None:
        raise InvalidInputError("a tune.json and a speedup target both choose the schedule; pass one of them")
    tuned = read_tune_file(schedule_from) if schedule_from is not None else None
    mode = check_int8_options(precision, runtime, data, quantization)
    if mode is not None and runtime == "openvino":
        import_nncf()  # fail before the export, naming the int8 extra
    runs = validate or measure or target_speedup is not None
    if runs:  # fail before the export: a runtime that cannot run the formulation, or a missing extra it needs
        formulation.check_runtime(runtime)
        formulation.prepare_runtime(runtime)
    if runtime == "openvino" and (runs or is_openvino_ir(output)):
        from tome_deploy.runtime.openvino import import_openvino

        import_openvino()  # fail before the export, naming the extra
    say(f"Loading {source.name} ...")
    loaded = load_model(source)
    say(f"  weights: {loaded.weights}")
    if tuned is not None:
        r = tuned_schedule(loaded, tuned, say)
    calibration = None
    if mode == "static" and data is not None:
        calibration = read_calibration_set(data, loaded, labels)
        say(f"  calibration: {calibration.count} images of --data {data} (the calibration part of its split)")
    options: dict[str, Any] = dict(
        merge=formulation,
        strict=strict,
        opset=opset,
        batch_size=batch_size,
        static_batch=static_batch,
        precision=precision,
        target=target,
    )
    choice = search = None
    with tempfile.TemporaryDirectory() as folder:
        if target_speedup is not None:
            choice = speedup_choice(describe(loaded.adapter, loaded.model), target_speedup, strict=strict)
            say(f"  {choice.line()}; measuring from there in {RUNTIME_LABELS[runtime]} (batch {batch_size}) ...")
            strides = SEARCH_STRIDES if sparse else (1,)
            search, timings_by_r = measured_search(loaded, choice, runtime, Path(folder), say, strides, **options)
            say(f"  {search.line(RUNTIME_LABELS[runtime])}")
            if not search.reached:
                raise ScheduleError(
                    f"no schedule reaches a measured {search.target:.2f}x in {RUNTIME_LABELS[runtime]} at batch "
                    f"{batch_size}: the best is {search.label()} at {search.speedup:.2f}x (FLOPs promised "
                    f"{choice.predicted:.2f}x from r={choice.r}); ask for at most {search.speedup:.2f}x, or export "
                    f"{search.option()} --measure"
                )
            r = search.schedule
        quality = tuned.quality if tuned is not None else None
        tome, schedule, metadata = patch_for_export(loaded, r, quality=quality, **options)
        say(
            f"Exporting ONNX (opset {opset}, merge={formulation.name}, {precision}, batch {metadata.batch or 'dynamic'}) ..."
        )
        with staged_artifact(output) as staged:
            result = write_artifact(tome, metadata, staged.temp, Path(folder), runtime, say, calibration, external_data)
            outcome = ExportOutcome(
                loaded,
                schedule,
                dataclasses.replace(result, path=output),
                target=choice,
                search=search,
                runtime=runtime,
            )
            if validate:
                say(f"Validating {RUNTIME_LABELS[runtime]} (CPU, {precision}) against PyTorch (fp32) ...")
                outcome.validation = validate_artifact(
                    tome, staged.temp, metadata, str(output), runtime, Path(folder), atol=atol, rtol=rtol
                )
            outcome.written = outcome.validation is None or outcome.validation.passed
            if not outcome.written:
                say(f"  the export failed validation and was not written to {output} (an existing file there is kept)")
                return outcome
            staged.commit()
        data = external_data_path(output)
        outcome.external_data = data if data.is_file() else None
        weights = f" (weights in {data.name} beside it)" if outcome.external_data else ""
        say(f"  wrote {output}{weights} in {result.seconds:.1f} s")
        if search is not None:
            outcome.timings = timings_by_r[search.r, search.stride]
        elif measure:
            base_path = unmerged_export(loaded, Path(folder), say, **options)
            say(f"Timing both in {RUNTIME_LABELS[runtime]} (CPU, batch {batch_size}, interleaved) ...")
            outcome.timings = time_against(base_path, output, metadata, runtime)
    return outcome


def validate_artifact(
    tome: torch.nn.Module,
    path: Path,
    metadata: ToMeMetadata,
    label: str,
    runtime: str,
    folder: Path,
    *,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
) -> ValidationReport:
    """The artifact at `path` against the PyTorch model in `runtime`; a reduced-precision one through its
    match twin (written in `folder`), so that its merge choices are compared too."""
    match_outputs = None
    if metadata.precision in REDUCED_PRECISIONS:
        path, match_outputs = match_twin(path, folder)
    return validate_runners(
        tome, [open_runner(path, runtime)], metadata, label, atol=atol, rtol=rtol, match_outputs=match_outputs
    )


def is_openvino_ir(output: str | Path) -> bool:
    return Path(output).suffix.lower() == OPENVINO_IR_SUFFIX


def check_artifact_output(output: str | Path, inputs) -> Path:
    """-o checked with the files written beside it: an OpenVINO IR's .bin, an ONNX file's external data."""
    if is_openvino_ir(output):
        weights = companion_path(Path(output), IR_WEIGHTS_SUFFIX)
        return check_outputs({"-o": output, "-o (weights)": weights}, inputs)["-o"]
    return check_onnx_output(output, inputs)


def staged_artifact(output: Path) -> StagedOutput:
    """Where the artifact is written until it passed validation, with the file that goes beside it: an
    IR's .bin, or an ONNX file's external data (written only when its weights go to a file of their own)."""
    if is_openvino_ir(output):
        return StagedOutput(output, companions=[companion_path(output, IR_WEIGHTS_SUFFIX)])
    return StagedOutput(output, companions=[external_data_path(output)])


def write_artifact(
    tome: torch.nn.Module,
    metadata: ToMeMetadata,
    path: Path,
    folder: Path,
    runtime: str,
    say: Say,
    calibration: Optional[CalibrationSet] = None,
    external_data: bool = False,
) -> ExportResult:
    """The ToMe model exported to ONNX and written at `path` in the export's precision and format: the ONNX
    file itself (its weights in a file beside it when over the single-file limit or with `external_data`); or,
    for an .xml path, an OpenVINO IR of it (bf16: its MatMuls in bf16, matching in f32); or for int8, the
    runtime's quantization of it (`quantize_artifact`, calibrated on `calibration` when given). `folder`: for
    intermediate files. The result's metadata is what the file holds."""
    precision = metadata.precision
    if precision != "int8" and not is_openvino_ir(path):
        return export_onnx(tome, metadata, path, external_data=external_data)
    result = export_onnx(tome, metadata, folder / "tome_fp32.onnx")
    if precision == "int8":
        metadata = quantize_artifact(
            result.path, path, runtime=runtime, metadata=metadata, say=say, calibration=calibration
        )
    else:
        precision_artifact(result.path, path, metadata=metadata, runtime=runtime, say=say)
    return dataclasses.replace(result, path=path, metadata=metadata)


def precision_artifact(
    onnx_path: Path,
    path: Path,
    *,
    metadata: ToMeMetadata,
    runtime: str,
    say: Say,
    calibration: Optional[CalibrationSet] = None,
) -> Path:
    """The fp32 export at `onnx_path` (ToMe or plain) written at `path` in metadata.precision: the runtime's
    int8 quantization of it (`quantize_artifact`, calibrated on `calibration` when given), or an OpenVINO IR
    of it (bf16: its MatMuls in bf16)."""
    if metadata.precision == "int8":
        quantize_artifact(onnx_path, path, runtime=runtime, metadata=metadata, say=say, calibration=calibration)
        return path
    from tome_deploy.runtime.openvino import write_ir

    say(f"  writing the OpenVINO IR ({metadata.precision}) ...")
    return write_ir(onnx_path, path, metadata.precision)


def quantize_artifact(
    onnx_path: Path,
    output: Path,
    *,
    runtime: str,
    metadata: ToMeMetadata,
    say: Say,
    calibration: Optional[CalibrationSet] = None,
) -> ToMeMetadata:
    """int8: the runtime's own quantizer applied to the fp32 ToMe export at `onnx_path`, written at `output`
    (an ONNX file for onnxruntime, an IR .xml for openvino) with the attention and MLP MatMuls quantized and
    every matching node (artifact/matching.matching_nodes) left in f32, and `metadata` (with its
    calibration record when calibrated) in the file; returns that metadata (jobs/int8.py)."""
    how = "NNCF" if runtime == "openvino" else ("static QDQ" if calibration is not None else "dynamic")
    say(f"  quantizing to int8 for {RUNTIME_LABELS[runtime]} ({how}) ...")
    return quantize_to_artifact(onnx_path, output, runtime, metadata, calibration)


def tuned_schedule(loaded: LoadedModel, tuned: TunedSchedule, say: Say) -> list[int]:
    """The r per layer of a tune.json, after checking it was tuned for these weights and this depth."""
    depth = describe(loaded.adapter, loaded.model).depth
    tuned.check_model(weights_fingerprint(loaded.model), depth, loaded.arch or type(loaded.model).__name__)
    quality = tuned.quality
    say(
        f"  schedule from {tuned.source}: r per layer {tuned.r_per_layer}, held-out {quality['metric']} "
        f"{quality['value']:g} on {quality['count']} images"
    )
    return tuned.r_per_layer


def patch_for_export(
    loaded: LoadedModel,
    r: RSpec,
    *,
    merge: MergeFormulation,
    strict,
    opset,
    batch_size,
    static_batch,
    precision,
    target,
    quality=None,
):
    """(ToMe model at the export's precision, its schedule, its metadata). quality: ToMeMetadata.quality."""
    tome, schedule = apply_tome(loaded.model, r, merge, strict=strict, adapter=loaded.adapter)
    metadata = build_metadata(
        tome,
        schedule,
        r,
        arch=loaded.arch or type(loaded.model).__name__,
        weights=loaded.weights,
        weights_sha256=weights_fingerprint(loaded.model),
        merge=merge.name,
        opset=opset,
        batch=batch_size if static_batch else None,
        example_batch=batch_size,
        precision=precision,
        target=target,
        quality=quality,
    )
    return with_precision(tome, precision), schedule, metadata


def unmerged_export(loaded: LoadedModel, folder: Path, say: Say, **options) -> Path:
    """The baseline of every timing, once per folder: a plain torch.onnx.export of the same weights
    (what a user without ToMe runs), at the export's precision, batch and opset."""
    path = folder / "unmerged.onnx"
    if not path.exists():
        say("Exporting the plain (unmerged) model for a side-by-side timing ...")
        _, _, metadata = patch_for_export(loaded, 0, **options)
        export_plain(with_precision(loaded.model, options["precision"]), metadata, path)
    return path


def time_against(
    base_path: Path, tome_path: Path, metadata: ToMeMetadata, runtime: str, rounds: int = 10
) -> dict[str, Timing]:
    """Unmerged and ToMe timed in `runtime`, interleaved, at the export's batch."""
    return time_interleaved(
        {"unmerged": base_path, "tome": tome_path},
        metadata.input.name,
        list(metadata.input.shape),
        metadata.example_batch,
        rounds=rounds,
        runtime=runtime,
    )


def measured_search(
    loaded: LoadedModel, choice: SpeedupChoice, runtime: str, folder: Path, say: Say, strides=SEARCH_STRIDES, **options
) -> tuple[ScheduleSearch, dict[tuple[int, int], dict[str, Timing]]]:
    """Export and time r from the FLOPs choice upwards until the measured speedup reaches the target, for
    the constant schedule and then for each sparser stride, below the FLOPs of the last that reached it
    (`speedup.search_measured_schedule`); also returns the timings of every (r, stride) measured."""
    shape = describe(loaded.adapter, loaded.model)
    depth, strict = shape.depth, options["strict"]
    base_path = unmerged_export(loaded, folder, say, **options)
    timings_by_r: dict[tuple[int, int], dict[str, Timing]] = {}

    def measure(r: int, stride: int) -> float:
        if stride > 1 and not any(s == stride for _, s in timings_by_r):
            say(f"  searching r in {every_block(stride)} (fewer blocks pay the fixed cost of matching) ...")
        tome, _, metadata = patch_for_export(loaded, sparse_schedule(r, stride, depth), **options)
        path = export_onnx(tome, metadata, folder / f"tome_r{r}_stride{stride}.onnx").path
        timings = timings_by_r[r, stride] = time_against(base_path, path, metadata, runtime)
        speedup = timings["unmerged"].median_s / timings["tome"].median_s
        say(f"  {stride_label(r, stride)}: measured {speedup:.2f}x")
        return speedup

    def flops(r: int, stride: int) -> float:
        return stride_speedup(r, shape.tokens, depth, shape.num_prefix, shape.width, shape.mlp_ratio, stride=stride)

    searches = [(1, choice.r, max(choice.r, largest_r(shape.tokens, depth, shape.num_prefix, strict)))]
    for stride in strides[1:]:
        if stride > depth:
            break
        try:
            r_first = speedup_choice(shape, choice.target, strict=strict, stride=stride).r
        except ScheduleError as err:
            say(f"  {err}: not searched")
            continue
        searches.append(
            (stride, r_first, max(r_first, largest_r(shape.tokens, depth, shape.num_prefix, strict, stride)))
        )
    return search_measured_schedule(choice.target, depth, searches, measure, flops), timings_by_r
