"""Checks for the values an artifact's metadata or sidecar holds, read back from JSON. Imports no torch.

Every check returns the value in its typed form or raises FieldError with what is wrong ("must be ...,
got ..."); the reader that called it turns that into one line naming the file, the key and the fix.
Bounds are generous for real models and small enough that a crafted file cannot drive allocations."""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

from tome_deploy.errors import InvalidInputError


class FieldError(ValueError):
    """A value that is not what its key must hold; the message says what is wrong."""


class NewerSchemaError(InvalidInputError):
    """An artifact written by a newer tome-deploy, in a schema version this one cannot read."""


def checked(label: str, reader: Callable[[Any], Any], value: Any) -> Any:
    """`reader(value)`, with a failure's message prefixed by the key's label."""
    try:
        return reader(value)
    except FieldError as err:
        raise FieldError(f"{label} {err}") from None


def schema_version(value: Any, newest: int, what: str, source: str) -> int:
    """The schema version a file declares; NewerSchemaError for one newer than `newest`."""
    version = whole(value, 1, 1 << 31)
    if version > newest:
        raise NewerSchemaError(
            f"{source} has {what} schema version {version}, but this tome-deploy reads versions up to {newest}; "
            "upgrade tome-deploy (pip install -U tome-deploy) to read it"
        )
    return version


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def whole(value: Any, low: int, high: int) -> int:
    """An int in [low, high] (a JSON bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FieldError(f"must be a whole number from {low} to {high}, got {_shown(value)}")
    return value


def real(value: Any, low: float, high: float) -> float:
    """A finite number in [low, high], as float."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        raise FieldError(f"must be a number from {low:g} to {high:g}, got {_shown(value)}")
    return float(value)


def text(value: Any, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise FieldError(f"must be {'a' if empty else 'a non-empty'} string, got {_shown(value)}")
    return value


def one_of(value: Any, options: Sequence[str]) -> str:
    if value not in options:
        raise FieldError(f"must be one of {', '.join(options)}, got {_shown(value)}")
    return value


def items(value: Any, length: int | None = None, *, max_length: int = 4096) -> list:
    """A JSON list, of exactly `length` entries when given (else at most max_length)."""
    if not isinstance(value, list):
        raise FieldError(f"must be a list, got {_shown(value)}")
    if length is not None and len(value) != length:
        raise FieldError(f"must have {length} entries, got {len(value)}")
    if len(value) > max_length:
        raise FieldError(f"must have at most {max_length} entries, got {len(value)}")
    return value


def each(check: Callable[..., Any], value: Any, *bounds: Any, length: int | None = None) -> list:
    """`check(entry, *bounds)` on every entry of a list; a failure names the entry."""
    checked = []
    for index, entry in enumerate(items(value, length)):
        try:
            checked.append(check(entry, *bounds))
        except FieldError as err:
            raise FieldError(f"entry {index} {err}") from None
    return checked


def name(value: Any, max_length: int) -> str:
    """A name of 1 to `max_length` ASCII letters, digits and _ . : @ + - (a metric's name, a hex fingerprint)."""
    if not isinstance(value, str) or len(value) > max_length or not re.fullmatch(r"[A-Za-z0-9_.:@+-]+", value):
        raise FieldError(f"must be 1 to {max_length} ASCII letters, digits or _ . : @ + -, got {_shown(value)}")
    return value


def numbers_by_name(value: Any, low: float, high: float, *, max_entries: int, max_name: int) -> dict[str, float]:
    """A JSON object of at most `max_entries` names (`name`) to finite numbers in [low, high]; a failure
    names the entry."""
    if not isinstance(value, dict):
        raise FieldError(f"must be a JSON object, got {_shown(value)}")
    if len(value) > max_entries:
        raise FieldError(f"must have at most {max_entries} entries, got {len(value)}")
    return {
        checked("has a key that", lambda n: name(n, max_name), key): checked(
            f"entry {key!r}", lambda v: real(v, low, high), number
        )
        for key, number in value.items()
    }


def record(value: Any, readers: dict[str, Callable[[Any], Any]]) -> dict[str, Any]:
    """A JSON object holding every key of `readers`, each value read by its reader (a failure names the key);
    keys it does not know are dropped."""
    if not isinstance(value, dict):
        raise FieldError(f"must be a JSON object, got {type(value).__name__}")
    missing = [key for key in readers if key not in value]
    if missing:
        raise FieldError(f"has no {missing[0]!r}")
    return {key: checked(repr(key), reader, value[key]) for key, reader in readers.items()}
