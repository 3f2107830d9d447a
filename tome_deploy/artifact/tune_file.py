"""The result of tome-tune (`tune.json`) as `tome-export --schedule-from` reads it. Imports no torch.

Only what an export needs is read and checked: the chosen schedule (`chosen.r_per_layer`), the weights it
was tuned for (`weights_sha256`), and the quality measured for it on held-out images (`metric`,
`chosen.held_out`, `held_out_count`, `data.fingerprint`), which the export records as `tome.quality`.
A missing, oversized or damaged file is refused with one line (TuneFileError) naming the file and the key."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from tome_deploy.artifact import checks
from tome_deploy.artifact.checks import FieldError
from tome_deploy.artifact.metadata import MAX_DEPTH, MAX_TOKENS, QUALITY_READERS
from tome_deploy.errors import InvalidInputError, display_path
from tome_deploy.input_files import read_input_bytes

MAX_TUNE_BYTES = 4 << 20  # a tune.json lists the held-out files: thousands of names, well under this
RERUN = "re-run tome-tune to write it again"
# key of ToMeMetadata.quality -> the tune.json key it is read from (its `value` is chosen.held_out[metric])
QUALITY_SOURCES = {
    "metric": "metric",
    "count": "held_out_count",
    "data_fingerprint": "data.fingerprint",
    "metrics": "chosen.held_out",
}


class TuneFileError(InvalidInputError):
    """A tune.json that cannot be used: missing, too large, damaged, or tuned for other weights or another model."""


@dataclass(frozen=True)
class TunedSchedule:
    """The schedule tome-tune chose, the weights it was chosen for, and the quality record to store."""

    source: str  # the file, as messages show it
    r_per_layer: list[int]
    weights_sha256: str
    quality: dict[str, Any]  # ToMeMetadata.quality

    def check_model(self, weights_sha256: str, depth: int, model: str) -> None:
        """Refuse a schedule tuned for other weights, or with another number of blocks than the model's."""
        if weights_sha256 != self.weights_sha256:
            raise TuneFileError(
                f"{self.source} was tuned for other weights (weights_sha256 {self.weights_sha256[:16]}..., the loaded "
                f"{model} has {weights_sha256[:16]}...); re-run tome-tune for these weights, or pass the same "
                "model, --checkpoint and --seed that tome-tune loaded"
            )
        if len(self.r_per_layer) != depth:
            raise TuneFileError(
                f"{self.source}: chosen.r_per_layer has {len(self.r_per_layer)} entries but {model} has {depth} "
                "blocks; re-run tome-tune for this model"
            )


def read_tune_file(path: str | Path) -> TunedSchedule:
    """The chosen schedule of a tune.json, checked (TuneFileError for a file that cannot be used)."""
    path = Path(path)
    source = display_path(path)
    values = _load_json(path, source)
    try:
        return TunedSchedule(
            source=source,
            r_per_layer=checks.checked("chosen.r_per_layer", _r_per_layer, _field(values, "chosen.r_per_layer")),
            weights_sha256=checks.checked("weights_sha256", checks.text, _field(values, "weights_sha256")),
            quality=_quality(values),
        )
    except FieldError as err:
        raise TuneFileError(f"{source}: {err}; {RERUN}") from None


def _quality(values: Mapping[str, Any]) -> dict[str, Any]:
    """ToMeMetadata.quality from the tune.json keys it is made of, with the bounds the artifact reader applies."""
    record = {
        key: checks.checked(dotted, QUALITY_READERS[key], _field(values, dotted))
        for key, dotted in QUALITY_SOURCES.items()
    }
    if record["metric"] not in record["metrics"]:
        raise FieldError(f"chosen.held_out has no entry for the metric {record['metric']!r}")
    return {"metric": record["metric"], "value": record["metrics"][record["metric"]], **record}


def _load_json(path: Path, source: str) -> Mapping[str, Any]:
    """The file's JSON object, refusing a missing, oversized, unreadable or non-JSON file before it is parsed."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise TuneFileError(f"{source} is not a file; pass the tune.json that tome-tune wrote")
        if size > MAX_TUNE_BYTES:
            raise TuneFileError(
                f"{source} has {size} bytes, more than a tune.json holds (at most {MAX_TUNE_BYTES}); pass the tune.json that tome-tune wrote"
            )
        raw = read_input_bytes(path, "tune file", MAX_TUNE_BYTES)
    except FileNotFoundError:
        raise TuneFileError(f"no such file: {source}; pass the tune.json that tome-tune wrote") from None
    except OSError as err:
        raise TuneFileError(f"{source} cannot be read ({err.strerror}); check its permissions") from None
    try:
        values = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise TuneFileError(f"{source} is not a tome-tune result (not JSON: {err}); {RERUN}") from None
    if not isinstance(values, dict):
        raise TuneFileError(f"{source} is not a tome-tune result (not a JSON object); {RERUN}")
    return values


def _field(values: Mapping[str, Any], dotted: str) -> Any:
    """values["a"]["b"] for "a.b"; FieldError naming the key when it or an object above it is missing."""
    value: Any = values
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise FieldError(f"{dotted} is missing")
        value = value[key]
    return value


def _r_per_layer(value: Any) -> list[int]:
    r_per_layer = checks.each(checks.whole, value, 0, MAX_TOKENS)
    if not 1 <= len(r_per_layer) <= MAX_DEPTH:
        raise FieldError(f"must have 1 to {MAX_DEPTH} entries (one per block), got {len(r_per_layer)}")
    return r_per_layer
