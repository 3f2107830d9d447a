"""The ToMe metadata every tome-deploy ONNX file carries in `metadata_props` (keys `tome.*`). Imports no torch.

Each key holds one JSON value. `tome.schema_version` says how to read them:
  1  files of tome-deploy 0.1.0 (no `tome.schema_version` key): the batch is the text "dynamic" or a
     number as text, and the example batch sits in `tome.extra` = {"example_batch": N}.
  2  `tome.batch` is a number or null (dynamic), `tome.example_batch` a number; the image input in flat
     keys `tome.input_name`, `tome.input_size` [C, H, W], `tome.mean`, `tome.std`, `tome.interpolation`,
     `tome.crop_pct`.
  3  this version: the input is one key, `tome.input`, an input spec (artifact/input_spec.py: its kind,
     name, whole static shape and preprocessing), so an input need not be an image.
Versions 1 and 2 are upgraded when read: their flat keys become an image input spec.
Optional keys that only inform (they change nothing in how the graph is run or its inputs prepared) are
added within a version: `tome.quality`, the quality tome-tune measured for the schedule, is such a key;
a reader that predates one ignores it, as every reader ignores `tome.*` keys it does not know.
`tome.calibration`, the images an int8 export was calibrated on, is another.
A reader refuses a newer version (NewerSchemaError: upgrade tome-deploy) and damaged values
(MetadataError: one line naming the file and the key; re-export with tome-export)."""

from __future__ import annotations

import json
from dataclasses import MISSING, dataclass, fields
from typing import Any, Mapping, Optional, Sequence, Union

from tome_deploy.artifact import checks
from tome_deploy.artifact.checks import FieldError
from tome_deploy.artifact.formulations import formulation_names
from tome_deploy.artifact.input_spec import INTERPOLATIONS, MAX_CHANNELS, MAX_IMAGE_SIDE, InputSpec, image_spec
from tome_deploy.artifact.spec import (
    EXPORT_SPEC,
    PRECISION_RUNTIMES,
    PRECISIONS,
    TARGETS,
)
from tome_deploy.errors import InvalidInputError

METADATA_PREFIX = "tome."
SCHEMA_VERSION = 3
SCHEMA_VERSION_KEY = METADATA_PREFIX + "schema_version"

# Bounds on what a file may declare: above any real ViT, below what would make a reader allocate much.
MAX_DEPTH = 1024
MAX_TOKENS = 1 << 20
MAX_QUALITY_METRICS = 64
MAX_NAME_LENGTH = 64  # a metric's name
MAX_FINGERPRINT_LENGTH = 128  # a data set's fingerprint (a sha256 is 64 hex digits)
MAX_QUALITY_VALUE = 1e12  # |value| of a metric: mean KL is unbounded above, accuracy drop is in points
MAX_QUALITY_COUNT = 1 << 40

# The schedule as requested: an int r, [r, inflect], or one r per layer.
ScheduleSpec = Union[int, list]


class MetadataError(InvalidInputError):
    """`tome.*` metadata that is damaged: not JSON, a wrong type, out of bounds, or a required key missing."""


@dataclass(frozen=True, kw_only=True)
class ToMeMetadata:
    """What an export records about itself; enough to rebuild the same PyTorch model for validation."""

    tool_version: str
    model: str  # timm architecture name
    weights: str  # human description of where the weights came from (a file name, never a local path)
    weights_sha256: str
    input: InputSpec  # what the graph takes (one sample; the batch axis is in front) and how it is prepared
    merge: str
    opset: int
    schedule: ScheduleSpec
    r_requested: list[int]  # depth entries
    r_effective: list[int]  # depth entries
    tokens_per_layer: list[int]  # depth + 1 entries: tokens entering each block, then the final count
    num_prefix_tokens: int
    theoretical_speedup: float
    batch: Optional[int] = None  # the fixed batch of a --static-batch export; None: dynamic
    example_batch: int = 1  # the batch the export was made (and is timed) at
    output_name: str = EXPORT_SPEC.output_name
    precision: str = "fp32"
    target: str = "onnxruntime"
    # What tome-tune measured for this schedule on held-out images, or None (not tuned):
    # {"metric": str, "value": float, "count": int, "data_fingerprint": str, "metrics": {name: float}}
    quality: Optional[dict[str, Any]] = None
    # The images a static int8 export was calibrated on, or None (not calibrated):
    # {"data_fingerprint": str, "count": int, "runtime": the runtime it was calibrated for}
    calibration: Optional[dict[str, Any]] = None

    @property
    def depth(self) -> int:
        return len(self.r_effective)

    def check_input(self, name: str, shape: Sequence[Any], source: str) -> None:
        """Refuse metadata that disagrees with the graph's (or engine's) input it describes: its name and its
        whole static shape after the batch axis (`shape`, one sample)."""
        if (name, list(shape)) != (self.input.name, list(self.input.shape)):
            raise MetadataError(
                f"{source}: tome.input says {self.input.name} {self.input.describe_shape()} but the "
                f"model's input is {name} {list(shape)}; re-export with tome-export"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, with the schema version first; `quality` and `calibration` only when recorded."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["input"] = self.input.to_dict()
        for optional in ("quality", "calibration"):
            if values[optional] is None:
                del values[optional]
        return {"schema_version": SCHEMA_VERSION, **json.loads(json.dumps(values))}

    def to_props(self) -> dict[str, str]:
        return {METADATA_PREFIX + key: json.dumps(value) for key, value in self.to_dict().items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str) -> ToMeMetadata:
        """Typed and checked metadata from JSON values (version 1, 2 or 3). Raises FieldError ("tome.KEY ...")
        for a damaged value and NewerSchemaError for a newer schema; `source` names the file in the latter."""
        version = 1
        if "schema_version" in values:
            version = checks.checked(
                SCHEMA_VERSION_KEY,
                lambda v: checks.schema_version(v, SCHEMA_VERSION, "ToMe metadata", source),
                values["schema_version"],
            )
        values = _upgrade_v1(values) if version == 1 else dict(values)
        if version < 3:
            values = _upgrade_v2(values)
        missing = [f.name for f in fields(cls) if f.name not in values and f.default is MISSING]
        if missing:
            raise FieldError(
                f"tome.{missing[0]} is missing ({len(missing)} required key{'s' if len(missing) > 1 else ''} missing)"
            )
        typed = {
            name: checks.checked(METADATA_PREFIX + name, reader, values[name])
            for name, reader in _READERS.items()
            if name in values
        }
        metadata = cls(**typed)
        _check_consistent(metadata)
        return metadata

    @classmethod
    def from_props(cls, props: Mapping[str, str], source: str = "the ONNX file") -> ToMeMetadata | None:
        """None when the props hold no `tome.*` key (not a tome-deploy export)."""
        values = {}
        for key, raw in props.items():
            if key.startswith(METADATA_PREFIX):
                try:
                    values[key[len(METADATA_PREFIX) :]] = json.loads(raw)
                except ValueError as err:
                    raise MetadataError(
                        f"{source}: {key} is not valid JSON ({err}); re-export with tome-export"
                    ) from None
        if not values:
            return None
        try:
            return cls.from_dict(values, source)
        except FieldError as err:
            raise MetadataError(f"{source}: {err}; re-export with tome-export") from None


def _upgrade_v1(values: Mapping[str, Any]) -> dict[str, Any]:
    """Version 1 (tome-deploy 0.1.0) -> version 2 values: batch as text -> int or None, example batch out of `extra`."""
    values = dict(values)
    batch = values.get("batch")
    if batch == "dynamic":
        values["batch"] = None
    elif isinstance(batch, str):
        if not batch.isdigit():
            raise FieldError(f'tome.batch must be "dynamic" or a whole number, got {batch!r}')
        values["batch"] = int(batch)
    extra = values.pop("extra", {})
    if not isinstance(extra, dict):
        raise FieldError(f"tome.extra must be a JSON object, got {extra!r}")
    if "example_batch" in extra:
        values["example_batch"] = extra["example_batch"]
    return values


# The flat image keys of versions 1 and 2 -> reader of each value.
_V2_INPUT_READERS = {
    "input_size": lambda v: checks.each(checks.whole, v, 1, MAX_IMAGE_SIDE, length=3),
    "mean": lambda v: checks.each(checks.real, v, -1e3, 1e3),
    "std": lambda v: checks.each(checks.real, v, 1e-6, 1e3),
    "interpolation": lambda v: checks.one_of(v, INTERPOLATIONS),
    "crop_pct": lambda v: checks.real(v, 0.25, 1.0),
}


def _upgrade_v2(values: Mapping[str, Any]) -> dict[str, Any]:
    """Version 2 (and upgraded 1) -> version 3 values: the flat image keys (each checked and named as the
    file names it) become `input`, an image input spec; `input_name` defaults to the export spec's."""
    values = dict(values)
    missing = [key for key in _V2_INPUT_READERS if key not in values]
    if missing:
        raise FieldError(f"tome.{missing[0]} is missing (a version 1 or 2 file records its image input in it)")
    image = {
        key: checks.checked(METADATA_PREFIX + key, reader, values.pop(key)) for key, reader in _V2_INPUT_READERS.items()
    }
    name = checks.checked("tome.input_name", checks.text, values.pop("input_name", EXPORT_SPEC.input_name))
    channels = image["input_size"][0]
    if channels > MAX_CHANNELS:
        raise FieldError(f"tome.input_size has {channels} channels; at most {MAX_CHANNELS}")
    for key in ("mean", "std"):
        if len(image[key]) != channels:
            raise FieldError(
                f"tome.{key} must have {channels} entries (one per channel of tome.input_size), got {len(image[key])}"
            )
    values["input"] = image_spec(name, **image).to_dict()
    return values


def _schedule(value: Any) -> ScheduleSpec:
    if isinstance(value, list):
        return checks.each(checks.real, value, -MAX_TOKENS, MAX_TOKENS)
    return checks.whole(value, 0, MAX_TOKENS)


def _batch(value: Any) -> Optional[int]:
    return None if value is None else checks.whole(value, 1, EXPORT_SPEC.max_batch)


def _quality_name(value: Any) -> str:
    return checks.name(value, MAX_NAME_LENGTH)


def _quality_number(value: Any) -> float:
    return checks.real(value, -MAX_QUALITY_VALUE, MAX_QUALITY_VALUE)


# key of the `tome.quality` record -> reader of its value
QUALITY_READERS = {
    "metric": _quality_name,
    "value": _quality_number,
    "count": lambda v: checks.whole(v, 1, MAX_QUALITY_COUNT),
    "data_fingerprint": lambda v: checks.name(v, MAX_FINGERPRINT_LENGTH),
    "metrics": lambda v: checks.numbers_by_name(
        v, -MAX_QUALITY_VALUE, MAX_QUALITY_VALUE, max_entries=MAX_QUALITY_METRICS, max_name=MAX_NAME_LENGTH
    ),
}


def read_quality(value: Any) -> Optional[dict[str, Any]]:
    """The `tome.quality` record, typed and bounded: None, or an object with `metric` (the name of the
    metric tome-tune chose by), `value` (its entry in `metrics`), `count` (held-out images),
    `data_fingerprint` (of the images) and `metrics` (name -> value). Keys it does not know are dropped."""
    if value is None:
        return None
    record = checks.record(value, QUALITY_READERS)
    if record["metrics"].get(record["metric"]) != record["value"]:
        raise FieldError(f"'value' must be the {record['metric']!r} entry of 'metrics', got {record['value']!r}")
    return record


# key of the `tome.calibration` record -> reader of its value
CALIBRATION_READERS = {
    "data_fingerprint": lambda v: checks.name(v, MAX_FINGERPRINT_LENGTH),
    "count": lambda v: checks.whole(v, 1, MAX_QUALITY_COUNT),
    "runtime": lambda v: checks.one_of(v, PRECISION_RUNTIMES["int8"]),
}


def read_calibration(value: Any) -> Optional[dict[str, Any]]:
    """The `tome.calibration` record, typed and bounded: None, or an object with `data_fingerprint` (of the
    calibration images), `count` (how many) and `runtime` (the runtime whose quantizer used them). Keys it
    does not know are dropped."""
    return None if value is None else checks.record(value, CALIBRATION_READERS)


# key -> reader of its JSON value. Lengths that depend on other keys are checked in _check_consistent.
_READERS = {
    "tool_version": checks.text,
    "model": checks.text,
    "weights": lambda v: checks.text(v, empty=True),
    "weights_sha256": checks.text,
    "input": InputSpec.from_dict,
    "merge": lambda v: checks.one_of(v, formulation_names()),
    "opset": lambda v: checks.whole(v, 1, 99),
    "schedule": _schedule,
    "r_requested": lambda v: checks.each(checks.whole, v, 0, MAX_TOKENS),
    "r_effective": lambda v: checks.each(checks.whole, v, 0, MAX_TOKENS),
    "tokens_per_layer": lambda v: checks.each(checks.whole, v, 1, MAX_TOKENS),
    "num_prefix_tokens": lambda v: checks.whole(v, 0, MAX_TOKENS),
    "theoretical_speedup": lambda v: checks.real(v, 1e-3, 1e4),
    "batch": _batch,
    "example_batch": lambda v: checks.whole(v, 1, EXPORT_SPEC.max_batch),
    "output_name": checks.text,
    "precision": lambda v: checks.one_of(v, PRECISIONS),
    "target": lambda v: checks.one_of(v, TARGETS),
    "quality": read_quality,
    "calibration": read_calibration,
}


def _check_consistent(meta: ToMeMetadata) -> None:
    """The keys agree: the schedule's lists with the depth and with each other (the input spec checks itself)."""
    depth = meta.depth
    if not 1 <= depth <= MAX_DEPTH:
        raise FieldError(f"tome.r_effective must have 1 to {MAX_DEPTH} entries (one per block), got {depth}")
    if len(meta.r_requested) != depth:
        raise FieldError(
            f"tome.r_requested must have {depth} entries (as tome.r_effective), got {len(meta.r_requested)}"
        )
    if len(meta.tokens_per_layer) != depth + 1:
        raise FieldError(
            f"tome.tokens_per_layer must have {depth + 1} entries (blocks + 1), got {len(meta.tokens_per_layer)}"
        )
    if isinstance(meta.schedule, list) and len(meta.schedule) > max(depth, 2):
        raise FieldError(f"tome.schedule has {len(meta.schedule)} entries for {depth} blocks")
    tokens, prefix = meta.tokens_per_layer, meta.num_prefix_tokens
    if prefix > tokens[0]:
        raise FieldError(f"tome.num_prefix_tokens is {prefix}, more than the {tokens[0]} tokens at the input")
    for layer, (asked, r) in enumerate(zip(meta.r_requested, meta.r_effective)):
        if r > asked or r > (tokens[layer] - prefix) // 2 or tokens[layer + 1] != tokens[layer] - r:
            raise FieldError(
                f"tome.r_effective and tome.tokens_per_layer disagree at block {layer} "
                f"({tokens[layer]} tokens, r {r} of {asked} asked, {tokens[layer + 1]} out)"
            )
