"""The tuning job: choose a schedule by the quality it costs on the user's own images; `tome-tune` is a thin
shell over `tune_model`.

1. The images are split (fixed seed) into a calibration part and a held-out part.
2. Search, on the calibration part only: every structured schedule (constant r, the paper's decreasing one,
   r in every 2nd / 3rd block) and a greedy per-layer allocation are scored against the unmerged model in
   eager PyTorch (the ToMe math is the export's, proven equal by validation; eager scoring avoids one export
   per trial).
3. The schedules within the budget on the calibration part are exported and measured in the target runtime:
   speed against a plain export of the same weights, and quality on the held-out part. Every number shown
   comes from there.
4. The choice is the fastest schedule within the budget on the held-out part (and reaching --target-speedup).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from tome_deploy import __version__
from tome_deploy.artifact.formulations import merge_for_target
from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.spec import EXPORT_SPEC, TUNE_PRECISIONS, artifact_suffix
from tome_deploy.core.flops import theoretical_speedup
from tome_deploy.core.schedule import ModelShape, resolve_schedule
from tome_deploy.core.schedule_search import (
    ScheduleCandidate,
    greedy_allocation,
    structured_candidates,
)
from tome_deploy.errors import InvalidInputError, ScheduleError
from tome_deploy.jobs.export import (
    patch_for_export,
    precision_artifact,
    time_against,
    unmerged_export,
)
from tome_deploy.jobs.int8 import calibration_set_of
from tome_deploy.jobs.progress import Say, silent
from tome_deploy.models.adapter import checked_input_spec, describe
from tome_deploy.models.loading.dispatch import LoadedModel, load_model
from tome_deploy.models.loading.fingerprint import weights_fingerprint
from tome_deploy.models.loading.source import ModelSource
from tome_deploy.models.patch import apply_tome
from tome_deploy.onnx_export.export import export_onnx
from tome_deploy.output_files import check_outputs, write_atomically
from tome_deploy.quality.budget import Budget
from tome_deploy.quality.data import DataConfig, ImageSet, check_decoded, read_image_folder
from tome_deploy.quality.metrics import Estimate, quality_metrics
from tome_deploy.quality.split import split_indices
from tome_deploy.runtime.factory import check_runtime, open_runner

TORCH_BATCH = 64  # images per eager forward while scoring calibration schedules
FASTEST_OF_EACH_KIND = 3  # schedules of each kind measured in the runtime besides the calibration frontier


def loss_of(metric: str, values: dict[str, float]) -> float:
    """Quality lost under `metric`: the accuracy drop in points, or 1 - agreement / cosine."""
    return values[metric] if metric == "accuracy_drop" else 1.0 - values[metric]


@dataclass
class TunedCandidate:
    schedule: ScheduleCandidate
    theoretical_speedup: float
    calibration: dict[str, float]
    measured_speedup: Optional[float] = None
    held_out: dict[str, Estimate] = field(default_factory=dict)
    within_budget: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.schedule.label,
            "kind": self.schedule.kind,
            "r_per_layer": list(self.schedule.r_per_layer),
            "theoretical_speedup": self.theoretical_speedup,
            "measured_speedup": self.measured_speedup,
            "held_out": {name: e.value for name, e in self.held_out.items()},
            "held_out_interval": {name: [e.low, e.high] for name, e in self.held_out.items()},
            "calibration": self.calibration,
            "within_budget": self.within_budget,
        }


@dataclass
class TuneOutcome:
    loaded: LoadedModel
    images: ImageSet
    output_kind: str
    metric: str
    budget: Budget
    target_speedup: Optional[float]
    calibration: list[int]  # indices into images.files
    held_out: list[int]
    files_read_by_search: tuple[str, ...]  # every file decoded before the held-out part was touched
    candidates: list[TunedCandidate]  # every schedule scored on the calibration part
    measured: list[TunedCandidate]  # those measured in the runtime, fastest theoretical first
    chosen: TunedCandidate
    best_constant: Optional[TunedCandidate]  # the fastest constant r within the budget, for comparison
    runtime: str
    batch_size: int
    split_seed: int
    held_out_fraction: float
    seconds: float
    timed_out: bool
    precision: str = "fp32"  # what the candidates were measured in (against the plain fp32 export)
    # Reduced precision: the plain model in that precision, measured as the candidates were
    # ({"measured_speedup": x, "held_out": {metric: value}}), the middle step of the stacking
    # plain fp32 -> plain reduced -> ToMe reduced; None for fp32.
    plain_reduced: Optional[dict[str, Any]] = None
    # int8: the images every candidate was calibrated on, {"data_fingerprint", "count"} as each int8
    # artifact's tome.calibration records them; None for fp32 and bf16.
    int8_calibration: Optional[dict[str, Any]] = None

    def to_json(self) -> dict[str, Any]:
        return {
            "tool_version": __version__,
            "model": self.loaded.arch or type(self.loaded.model).__name__,
            "weights_sha256": weights_fingerprint(self.loaded.model),
            "runtime": self.runtime,
            "precision": self.precision,
            "plain_reduced": self.plain_reduced,
            "int8_calibration": self.int8_calibration,
            "batch_size": self.batch_size,
            "output_kind": self.output_kind,
            "data": {
                "fingerprint": self.images.fingerprint,
                "images": len(self.images.files),
                "unreadable": len(self.images.unreadable),
                "labels": self.images.labels is not None,
            },
            "split_seed": self.split_seed,
            "held_out_fraction": self.held_out_fraction,
            "calibration_count": len(self.calibration),
            "held_out_count": len(self.held_out),
            "held_out_files": [self.images.files[i] for i in self.held_out],
            "metric": self.metric,
            "budget": {
                **dataclasses.asdict(self.budget),
                "target_speedup": self.target_speedup,
            },
            "chosen": self.chosen.to_dict(),
            "candidates": [candidate.to_dict() for candidate in self.candidates],
        }


def tune_model(
    source: ModelSource | str,
    data: str | Path,
    output: str | Path,
    *,
    budget: Budget,
    labels: Optional[str | Path] = None,
    target_speedup: Optional[float] = None,
    metric: Optional[str] = None,
    runtime: str = "onnxruntime",
    batch_size: int = 8,
    held_out_fraction: float = 0.5,
    split_seed: int = 0,
    max_minutes: Optional[float] = None,
    cache: Optional[str | Path] = None,
    greedy: bool = True,
    precision: str = "fp32",
    say: Say = silent,
) -> TuneOutcome:
    """Search schedules on the calibration part of `data`, measure the ones within `budget` in `runtime`, and
    write the result to `output` (tune.json). Raises InvalidInputError for bad data or options (nothing is
    written) and ScheduleError when no schedule fits the budget (naming the best trade-off found).

    precision: what ships (fp32, bf16 or int8). The search scores schedules in fp32 PyTorch; the finalists
    are measured as the shipped artifact (a bf16 IR, an int8 file) against the plain fp32 export, in speed and
    held-out quality, and so is the plain model in that precision (`TuneOutcome.plain_reduced`)."""
    started = time.monotonic()
    deadline = None if max_minutes is None else started + 60.0 * max_minutes
    check_runtime(runtime)
    check_tune_precision(precision, runtime)
    if not isinstance(source, ModelSource):
        source = ModelSource(source)
    paths = check_outputs({"-o": output, "--cache": cache}, inputs=(source.name, source.checkpoint))
    images = read_image_folder(data, labels)
    say(f"Loading {source.name} ...")
    loaded = load_model(source)
    kind = loaded.adapter.output_kind(loaded.model)
    budget.check(kind, images.labels is not None)
    metric = _budget_metric(budget, metric)
    shape = describe(loaded.adapter, loaded.model)
    config = DataConfig.of(checked_input_spec(loaded.adapter, loaded.model, str(source.name)), "tome-tune")
    calibration, held_out = split_indices(
        len(images.files), images.labels, held_out_fraction=held_out_fraction, seed=split_seed
    )
    say(f"  {len(images.files)} images: {len(calibration)} to search on, {len(held_out)} held out (seed {split_seed})")
    store = _Cache(
        paths.get("--cache"),
        _context_key(loaded, images, runtime, batch_size, held_out_fraction, split_seed, precision),
    )

    pixels, kept = images.pixels(calibration, config)
    check_decoded(images, len(kept))
    calibration_labels = _labels_of(images, kept)
    score = _calibration_scorer(loaded, kind, pixels, calibration_labels, store)
    schedules = structured_candidates(shape)
    say(f"Scoring {len(schedules)} schedules on the calibration images ...")
    candidates = [_scored(schedule, score, shape) for schedule in schedules]
    timed_out = False
    if greedy:
        say("Greedy per-layer search (merges go where they cost least quality per FLOP saved) ...")

        def greedy_loss(r_per_layer: tuple[int, ...]) -> Optional[float]:
            values = score(r_per_layer)
            return loss_of(metric, values) if budget.within(values) else None

        path = greedy_allocation(shape, greedy_loss, deadline=deadline)
        candidates += [_scored(schedule, score, shape) for schedule in path]
        timed_out = deadline is not None and time.monotonic() >= deadline
    files_read_by_search = tuple(images.loaded)
    quantizer_images = calibration_set_of(images, kept, config) if precision == "int8" else None

    for candidate in candidates:
        candidate.within_budget = budget.within(candidate.calibration)
    finalists = _finalists(candidates, metric)
    measured, timed_out, plain_reduced = _measure_in_runtime(
        loaded,
        finalists,
        images,
        held_out,
        config,
        kind,
        runtime,
        batch_size,
        store,
        deadline,
        timed_out,
        say,
        precision,
        quantizer_images,
    )
    for candidate in measured:
        candidate.within_budget = budget.within({name: e.value for name, e in candidate.held_out.items()})
    chosen = _choose(measured, metric, budget, target_speedup)
    constants = [c for c in measured if c.schedule.kind == "constant" and c.within_budget]
    outcome = TuneOutcome(
        loaded=loaded,
        images=images,
        output_kind=kind,
        metric=metric,
        budget=budget,
        target_speedup=target_speedup,
        calibration=calibration,
        held_out=held_out,
        files_read_by_search=files_read_by_search,
        candidates=candidates,
        measured=measured,
        chosen=chosen,
        best_constant=max(constants, key=_speed, default=None),
        runtime=runtime,
        batch_size=batch_size,
        split_seed=split_seed,
        held_out_fraction=held_out_fraction,
        seconds=time.monotonic() - started,
        timed_out=timed_out,
        precision=precision,
        plain_reduced=plain_reduced,
        int8_calibration=None
        if quantizer_images is None
        else {"data_fingerprint": quantizer_images.fingerprint, "count": quantizer_images.count},
    )
    write_atomically(paths["-o"], lambda stream: stream.write(json.dumps(outcome.to_json(), indent=1).encode()))
    return outcome


def _budget_metric(budget: Budget, metric: Optional[str]) -> str:
    bounded = budget.bounded_metrics()
    if len(bounded) > 1:
        raise InvalidInputError("pass one of --max-drop, --min-agreement and --min-cosine, not several")
    if not bounded:
        raise InvalidInputError(
            "a budget is needed: pass --max-drop POINTS (with labels), --min-agreement F or --min-cosine F"
        )
    if metric is not None and metric != bounded[0]:
        raise InvalidInputError(
            f"--metric {metric} disagrees with the budget, which bounds {bounded[0]}; drop --metric"
        )
    return bounded[0]


def _finalists(candidates: list[TunedCandidate], metric: str) -> list[TunedCandidate]:
    """What is worth measuring in the runtime, fastest in FLOPs first: the schedules within the budget on the
    calibration images that no other beats in both FLOPs and calibration quality, and the FASTEST_OF_EACH_KIND
    fastest of each kind (so the best constant r is always compared). With none within the budget, the one that loses least."""
    within = [c for c in candidates if c.within_budget]
    if not within:
        return [min(candidates, key=lambda c: loss_of(metric, c.calibration))]
    frontier, best_loss = [], float("inf")
    for candidate in sorted(within, key=lambda c: (-c.theoretical_speedup, loss_of(metric, c.calibration))):
        loss = loss_of(metric, candidate.calibration)
        if loss < best_loss:
            frontier.append(candidate)
            best_loss = loss
    fastest_of_kind: dict[str, list[TunedCandidate]] = {}
    for candidate in sorted(within, key=lambda c: -c.theoretical_speedup):
        kind = fastest_of_kind.setdefault(candidate.schedule.kind, [])
        if len(kind) < FASTEST_OF_EACH_KIND:
            kind.append(candidate)
    chosen = {id(c): c for c in [*frontier, *(c for kind in fastest_of_kind.values() for c in kind)]}
    return sorted(chosen.values(), key=lambda c: -c.theoretical_speedup)


def _labels_of(images: ImageSet, indices: list[int]) -> Optional[np.ndarray]:
    return None if images.labels is None else np.asarray([images.labels[i] for i in indices])


def _forward(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    """Eager outputs [N, K] in batches of TORCH_BATCH."""
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(pixels), TORCH_BATCH):
            outputs.append(model(torch.from_numpy(pixels[start : start + TORCH_BATCH])).float().numpy())
    return np.concatenate(outputs)


def _calibration_scorer(
    loaded: LoadedModel, kind: str, pixels: np.ndarray, labels: Optional[np.ndarray], store: _Cache
):
    """r_per_layer -> point values of every quality metric on the calibration images (eager PyTorch)."""
    reference = _forward(loaded.model, pixels)

    def score(r_per_layer: tuple[int, ...]) -> dict[str, float]:
        cached = store.get(r_per_layer, "calibration")
        if cached is not None:
            return cached
        tome, _ = apply_tome(
            loaded.model, list(r_per_layer), merge_for_target(None, "onnxruntime"), strict=True, adapter=loaded.adapter
        )
        values = {name: e.value for name, e in quality_metrics(kind, reference, _forward(tome, pixels), labels).items()}
        store.put(r_per_layer, "calibration", values)
        return values

    return score


def _scored(schedule: ScheduleCandidate, score, shape: ModelShape) -> TunedCandidate:
    resolved = resolve_schedule(list(schedule.r_per_layer), shape.tokens, shape.depth, shape.num_prefix)
    speedup = theoretical_speedup(resolved.tokens, shape.width, shape.mlp_ratio)
    return TunedCandidate(schedule, speedup, score(schedule.r_per_layer))


def check_tune_precision(precision: str, runtime: str) -> str:
    """The precisions tome-tune measures in, and only in a runtime that runs them (one-line errors)."""
    if precision not in TUNE_PRECISIONS:
        raise InvalidInputError(f"tome-tune measures --precision {' or '.join(TUNE_PRECISIONS)}, not {precision!r}")
    return EXPORT_SPEC.check_precision(precision, runtime, "candidate" + artifact_suffix(precision, runtime))


def _measure_in_runtime(
    loaded,
    finalists,
    images,
    held_out,
    config,
    kind,
    runtime,
    batch_size,
    store,
    deadline,
    timed_out,
    say,
    precision,
    quantizer_images,
) -> tuple[list[TunedCandidate], bool, Optional[dict[str, Any]]]:
    """Speed against the plain fp32 export and held-out quality, in `runtime` and `precision`, for each
    finalist until the deadline (at least one is always measured); for a reduced precision also the plain
    model in it (the third value, else None). int8 is quantized statically, calibrated on `quantizer_images`
    (drawn from the calibration part, as `tome-export --precision int8 --data` draws them)."""
    pixels, kept = images.pixels(held_out, config)
    check_decoded(images, len(kept))
    labels = _labels_of(images, kept)
    options: dict[str, Any] = dict(
        merge=merge_for_target(None, "onnxruntime"),
        strict=True,
        opset=18,
        batch_size=batch_size,
        static_batch=False,
        precision="fp32",
        target="onnxruntime",
    )
    measured: list[TunedCandidate] = []
    with tempfile.TemporaryDirectory() as folder:

        def shipped(onnx_path: Path, metadata: ToMeMetadata, stem: str) -> Path:
            """The fp32 export as it ships in `precision` (itself for fp32)."""
            if precision == "fp32":
                return onnx_path
            target = Path(folder) / (stem + artifact_suffix(precision, runtime))
            shipped_metadata = dataclasses.replace(metadata, precision=precision)
            return precision_artifact(
                onnx_path, target, metadata=shipped_metadata, runtime=runtime, say=silent, calibration=quantizer_images
            )

        def measure(path: Path, metadata: ToMeMetadata) -> dict[str, Any]:
            timings = time_against(plain, path, metadata, runtime)
            estimates = quality_metrics(kind, reference, _run(path, runtime, pixels, batch_size), labels)
            return {
                "measured_speedup": timings["unmerged"].median_s / timings["tome"].median_s,
                "held_out": {name: [e.value, e.low, e.high, e.count] for name, e in estimates.items()},
            }

        plain = unmerged_export(loaded, Path(folder), say, **options)
        reference = _run(plain, runtime, pixels, batch_size)
        plain_reduced = None
        if precision != "fp32":
            say(f"Measuring the plain model in {precision} against plain fp32 ...")
            _, _, plain_metadata = patch_for_export(loaded, 0, **options)
            record = measure(shipped(plain, plain_metadata, "plain"), plain_metadata)
            plain_reduced = {**record, "held_out": {name: values[0] for name, values in record["held_out"].items()}}
        say(
            f"Measuring {len(finalists)} schedules in {runtime} ({precision}): speed against the plain fp32 export, "
            "held-out quality ..."
        )
        for index, candidate in enumerate(finalists, 1):
            if measured and deadline is not None and time.monotonic() >= deadline:
                say(f"  --max-minutes reached: {len(finalists) - len(measured)} schedules not measured")
                return measured, True, plain_reduced
            cached = store.get(candidate.schedule.r_per_layer, "runtime")
            note = " (cached)" if cached is not None else ""
            if cached is None:
                tome, _, metadata = patch_for_export(loaded, list(candidate.schedule.r_per_layer), **options)
                path = export_onnx(tome, metadata, Path(folder) / f"candidate_{index}.onnx").path
                cached = measure(shipped(path, metadata, f"candidate_{index}"), metadata)
                store.put(candidate.schedule.r_per_layer, "runtime", cached)
            candidate.measured_speedup = cached["measured_speedup"]
            candidate.held_out = {name: Estimate(*values) for name, values in cached["held_out"].items()}
            say(
                f"  [{index}/{len(finalists)}] {candidate.schedule.label}: {candidate.measured_speedup:.2f}x measured{note}"
            )
            measured.append(candidate)
    return measured, timed_out, plain_reduced


def _run(path: Path, runtime: str, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    with open_runner(path, runtime) as runner:
        outputs = [
            next(iter(runner.infer({"pixel_values": pixels[start : start + batch_size]}).values()))
            for start in range(0, len(pixels), batch_size)
        ]
    return np.concatenate(outputs)


def _speed(candidate: TunedCandidate) -> float:
    return candidate.measured_speedup or 0.0


def _choose(
    measured: list[TunedCandidate], metric: str, budget: Budget, target_speedup: Optional[float]
) -> TunedCandidate:
    fits = [c for c in measured if c.within_budget and (target_speedup is None or _speed(c) >= target_speedup)]
    if fits:
        return max(fits, key=_speed)
    best = min(measured, key=lambda c: loss_of(metric, {n: e.value for n, e in c.held_out.items()}))
    value = best.held_out[metric].value
    wanted = budget.describe() + (f" at {target_speedup:.2f}x or more" if target_speedup else "")
    raise ScheduleError(
        f"no schedule fits {wanted}: the best trade-off found is {best.schedule.label} with {metric} {value:.4g} "
        f"at {_speed(best):.2f}x measured; export it with --schedule {','.join(map(str, best.schedule.r_per_layer))}, "
        "or loosen the budget"
    )


def _context_key(
    loaded: LoadedModel, images: ImageSet, runtime: str, batch: int, fraction: float, seed: int, precision: str
) -> str:
    """What a cached measurement depends on besides its schedule."""
    quantization = "static" if precision == "int8" else None  # int8 candidates are calibrated (not dynamic)
    return json.dumps(
        [weights_fingerprint(loaded.model), images.fingerprint, runtime, batch, fraction, seed, precision, quantization]
    )


class _Cache:
    """Measurements by schedule, kept in a JSON file so an interrupted or repeated search resumes; entries of
    another model, data set, split, runtime or batch are ignored."""

    def __init__(self, path: Optional[Path], context: str):
        self.path, self.context = path, context
        self.entries: dict[str, Any] = {}
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError):
                stored = {}
            if (
                isinstance(stored, dict)
                and stored.get("context") == context
                and isinstance(stored.get("entries"), dict)
            ):
                self.entries = stored["entries"]

    def get(self, r_per_layer: tuple[int, ...], part: str) -> Optional[Any]:
        return self.entries.get(f"{part}:{','.join(map(str, r_per_layer))}")

    def put(self, r_per_layer: tuple[int, ...], part: str, value: Any) -> None:
        self.entries[f"{part}:{','.join(map(str, r_per_layer))}"] = value
        if self.path is not None:
            body = json.dumps({"context": self.context, "entries": self.entries}).encode()
            write_atomically(self.path, lambda stream: stream.write(body), flag="--cache")
