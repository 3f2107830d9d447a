"""The validation job: rebuild the PyTorch ToMe model an ONNX file or engine came from and compare them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.onnx_file import external_data_path, read_metadata
from tome_deploy.artifact.sidecar import (
    EngineSidecar,
    file_sha256,
    is_engine_file,
    read_sidecar,
    sidecar_path,
)
from tome_deploy.artifact.spec import EXPORT_SPEC, OPENVINO_IR_SUFFIX, REDUCED_PRECISIONS
from tome_deploy.errors import InvalidInputError, ScheduleError
from tome_deploy.jobs.progress import Say, silent
from tome_deploy.models.loading.dispatch import load_model
from tome_deploy.models.loading.fingerprint import weights_fingerprint
from tome_deploy.models.loading.source import LoadedModel, ModelSource
from tome_deploy.models.patch import apply_tome
from tome_deploy.onnx_export.export import export_plain
from tome_deploy.onnx_export.precision import with_precision
from tome_deploy.output_files import check_outputs
from tome_deploy.quality.budget import Budget
from tome_deploy.quality.data import DataConfig, read_image_folder
from tome_deploy.quality.metrics import quality_metrics
from tome_deploy.quality.report import QualityReport, headline_metric, output_kind, paired_outputs
from tome_deploy.runtime.base import Runner
from tome_deploy.runtime.factory import RUNTIME_LABELS, open_runner
from tome_deploy.validation.compare import check_tolerances
from tome_deploy.validation.merge_agreement import match_twin
from tome_deploy.validation.parity import (
    ValidationReport,
    default_batch_sizes,
    validate_runners,
)
from tome_deploy.validation.polygraphy_reference import (
    inputs_path_for,
    save_polygraphy_reference,
)


def validate_model(
    source: ModelSource | str,
    artifact: str | Path,
    *,
    batch_sizes: Optional[Sequence[int]] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    save_reference: Optional[str | Path] = None,
    runtime: str = "onnxruntime",
    say: Say = silent,
) -> tuple[ToMeMetadata, ValidationReport]:
    """Rebuild the PyTorch ToMe model an ONNX file or engine came from and compare them.

    An engine (tome-build output) is compared with PyTorch and, when its ONNX file is still where the
    sidecar says, with ONNX Runtime too. runtime: what runs an ONNX file (onnxruntime or openvino).
    save_reference: also write the PyTorch outputs in Polygraphy's format.
    source: the model as given to tome-export; its img_size is taken from the artifact.
    """
    check_tolerances(atol, rtol)
    if not isinstance(source, ModelSource):
        source = ModelSource(source)
    engine = is_engine_file(artifact)
    sidecar = read_sidecar(artifact) if engine else None
    metadata = _artifact_metadata(artifact, sidecar)
    candidates = [open_runner(artifact, runtime)]  # checked now, before the model loads; activated to compare
    if save_reference is not None:
        check_outputs(
            {"--save-reference": save_reference, "--save-reference inputs": inputs_path_for(save_reference)},
            inputs=(source.name, source.checkpoint, *validation_inputs(artifact)),
        )
    say(f"Loading {source.name} ...")
    loaded = _load_exported_model(source, artifact, metadata)
    try:
        tome, _ = apply_tome(loaded.model, list(metadata.r_effective), metadata.merge, strict=True)
        tome = with_precision(tome, metadata.precision)
    except ScheduleError as err:
        raise InvalidInputError(f"{artifact} was exported for another architecture: {err}") from err
    if batch_sizes and metadata.batch is not None and any(b != metadata.batch for b in batch_sizes):
        raise InvalidInputError(f"{artifact} has a fixed batch of {metadata.batch}; validate at that batch size only")
    if save_reference is not None:
        batch = metadata.batch or 1
        outputs, inputs = save_polygraphy_reference(tome, metadata, save_reference, batch)
        tolerance = EXPORT_SPEC.tolerance(metadata.precision)
        onnx_file = sidecar.onnx_path if sidecar else artifact
        say(
            f"  wrote the PyTorch reference for Polygraphy: {outputs} (inputs: {inputs}); check with\n"
            f"    polygraphy run {onnx_file} --trt --load-inputs {inputs} --load-outputs {outputs} "
            f"--atol {tolerance.atol:g} --rtol {tolerance.rtol:g}"
        )
    if sidecar is None and metadata.precision in REDUCED_PRECISIONS:  # judged with its merge choices
        say(f"Validating {RUNTIME_LABELS[runtime]} (CPU, {metadata.precision}) against PyTorch (fp32) ...")
        with tempfile.TemporaryDirectory(prefix="tome-validate-") as folder:
            twin, match_outputs = match_twin(artifact, Path(folder))
            return metadata, validate_runners(
                tome,
                [open_runner(twin, runtime)],
                metadata,
                str(artifact),
                batch_sizes=batch_sizes,
                atol=atol,
                rtol=rtol,
                match_outputs=match_outputs,
            )
    if sidecar is None:  # an ONNX file or an OpenVINO IR
        say(f"Validating {RUNTIME_LABELS[runtime]} (CPU) against PyTorch ...")
        return metadata, validate_runners(
            tome, candidates, metadata, str(artifact), batch_sizes=batch_sizes, atol=atol, rtol=rtol
        )
    candidates += _source_onnx_runner(sidecar, say)
    profile = sidecar.profiles[0]
    batches = batch_sizes or sorted({min(max(b, profile.min), profile.max) for b in default_batch_sizes(metadata)})
    say(f"Validating {' and '.join(c.name for c in candidates)} against PyTorch ...")
    return metadata, validate_runners(
        tome, candidates, metadata, str(artifact), batch_sizes=batches, atol=atol, rtol=rtol
    )


def validate_quality(
    source: ModelSource | str,
    artifact: str | Path,
    data: str | Path,
    *,
    labels_file: Optional[str | Path] = None,
    budget: Optional[Budget] = None,
    metric: Optional[str] = None,
    batch_size: Optional[int] = None,
    runtime: str = "onnxruntime",
    say: Say = silent,
) -> QualityReport:
    """The artifact's quality on every image under `data` against the plain (unmerged) model it came from.

    The plain model is exported with export_plain to a temporary folder (same weights, input size, batch and
    opset; removed afterwards) and both files run in `runtime` on the images as the artifact's metadata
    preprocesses them. The output kind is "logits" for an output named "logits" of shape [n, classes > 1]
    unless `metric` names an embedding metric, else "embedding". The report's `violations` list the broken
    bounds of `budget` (None: no bound). InvalidInputError for bad data (before any model loads) and, after
    the run (they depend on the output kind), for a bound or metric that does not apply.
    batch_size: images per run (default: the artifact's fixed batch, else 8)."""
    if not isinstance(source, ModelSource):
        source = ModelSource(source)
    images = read_image_folder(data, labels_file)
    engine = is_engine_file(artifact)
    metadata = _artifact_metadata(artifact, read_sidecar(artifact) if engine else None)
    config = DataConfig.of(metadata.input, "tome-validate --data")
    batch = _quality_batch(batch_size, metadata)
    candidate = open_runner(artifact, runtime)
    say(f"Loading {source.name} ...")
    loaded = _load_exported_model(source, artifact, metadata)
    with tempfile.TemporaryDirectory(prefix="tome-validate-") as folder:
        say("Exporting the plain model for reference ...")
        plain = export_plain(loaded.model, metadata, Path(folder) / "plain.onnx")
        say(f"Running {len(images.files)} images of {data} through both models ({RUNTIME_LABELS[runtime]}) ...")
        with open_runner(plain, runtime) as reference, candidate:
            expected, got, decoded = paired_outputs(
                reference,
                candidate,
                images,
                range(len(images.files)),
                config,
                input_name=metadata.input.name,
                output_name=metadata.output_name,
                batch_size=batch,
                fixed_batch=metadata.batch is not None,
            )
    kind = output_kind(metadata.output_name, expected.shape, metric)
    has_labels = images.labels is not None
    budget = budget or Budget()
    budget.check(kind, has_labels)
    labels = np.asarray([images.labels[i] for i in decoded]) if images.labels is not None else None
    return QualityReport(
        artifact=str(artifact),
        data=str(data),
        fingerprint=images.fingerprint,
        images=len(images.files),
        unreadable=len(images.unreadable),
        kind=kind,
        metric=headline_metric(kind, has_labels, metric),
        metrics=quality_metrics(kind, expected.reshape(len(expected), -1), got.reshape(len(got), -1), labels),
        budget=budget,
    )


def _quality_batch(batch_size: Optional[int], metadata: ToMeMetadata) -> int:
    """--batch-size, checked against the spec and a fixed-batch artifact; default its batch, else 8."""
    if batch_size is None:
        return metadata.batch or 8
    EXPORT_SPEC.check_batch(batch_size, "--batch-size")
    if metadata.batch is not None and batch_size != metadata.batch:
        raise InvalidInputError(
            f"the artifact has a fixed batch of {metadata.batch}; drop --batch-size or pass {metadata.batch}"
        )
    return batch_size


def _load_exported_model(source: ModelSource, artifact: str | Path, metadata: ToMeMetadata) -> LoadedModel:
    """The model `artifact` was exported from, at its input size; InvalidInputError for other weights."""
    loaded = load_model(source.at_img_size(_image_width(metadata)))
    if weights_fingerprint(loaded.model) != metadata.weights_sha256:
        raise InvalidInputError(
            f"the weights of {source.name} ({loaded.weights}) differ from those {artifact} was exported from "
            f"({metadata.weights}); pass the same model, --checkpoint and --seed as for tome-export"
        )
    return loaded


def _image_width(metadata: ToMeMetadata) -> Optional[int]:
    """The input size a loader is asked for: the width of an image or of each video frame; None (the model's
    own) for a spectrogram."""
    spec = metadata.input
    return spec.image_size[1] if spec.kind in ("image", "video") else None


def _source_onnx_runner(sidecar: EngineSidecar, say: Say) -> list[Runner]:
    """ONNX Runtime on the ONNX file the engine was built from, when it is still there unchanged."""
    onnx_file = Path(sidecar.onnx_path)
    if onnx_file.is_file() and file_sha256(onnx_file) == sidecar.onnx_sha256:
        return [open_runner(onnx_file)]
    say(f"  note: the engine's ONNX file {onnx_file} is gone or changed; comparing the engine with PyTorch only")
    return []


def validation_inputs(artifact: str | Path) -> tuple[Path, ...]:
    """The files validating `artifact` reads: the artifact, its external-data file when it has one, and, for
    an engine, its sidecar and the ONNX file the sidecar names (when it can be read; a damaged sidecar is
    refused later by read_sidecar)."""
    files = [Path(artifact), external_data_path(artifact)]  # an ONNX file's weights may be beside it
    if is_engine_file(artifact):
        files.append(sidecar_path(artifact))
        try:
            files.append(Path(json.loads(sidecar_path(artifact).read_text())["onnx_path"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return tuple(files)


def _artifact_metadata(artifact: str | Path, sidecar: Optional[EngineSidecar]) -> ToMeMetadata:
    if sidecar is None and Path(artifact).suffix.lower() == OPENVINO_IR_SUFFIX:
        from tome_deploy.runtime.openvino import read_ir_metadata

        metadata = ToMeMetadata.from_props(read_ir_metadata(artifact), str(artifact))
    elif sidecar is None:
        metadata = read_metadata(artifact)
    else:
        metadata = sidecar.tome
    if metadata is None:
        raise InvalidInputError(
            f"{artifact} carries no tome-deploy metadata; validate files written by tome-export / tome-build"
        )
    return metadata
