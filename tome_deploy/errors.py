"""Typed errors. Each message names the problem and the fix; the CLI prints it as one line."""

from __future__ import annotations

import re
from pathlib import Path


class ToMeError(Exception):
    """Base class; `exit_code` is what the command-line tools return for it."""

    exit_code = 2


class ScheduleError(ToMeError, ValueError):
    """An r value or schedule that cannot be applied."""


class UnsupportedModelError(ToMeError, TypeError):
    """A model that is not a timm VisionTransformer ToMe can rewrite."""


class ModelLoadError(ToMeError):
    """A model name, checkpoint or pickle that cannot be loaded (safely)."""


class UnsafePickleError(ModelLoadError):
    """A pickled module that needs globals outside the allowlist."""


class InvalidInputError(ToMeError, ValueError):
    """A bad argument: image size, output path, opset, batch size..."""


class ExportError(ToMeError):
    """The exporter or the ONNX checker failed."""

    exit_code = 3


class MissingDependencyError(ToMeError, ImportError):
    """An optional dependency is not installed."""

    exit_code = 4


class ValidationFailedError(ToMeError):
    """Parity validation ran and at least one check failed."""

    exit_code = 1


class QualityBudgetError(ToMeError):
    """The model ran on the user's images (tome-validate --data) and a quality bound does not hold."""

    exit_code = 5


def display_path(path: Path) -> str:
    """A path as the user should see it in a message (absolute when it resolves)."""
    try:
        return str(path.expanduser().resolve())
    except OSError:
        return str(path)


def error_reason(err: BaseException) -> str:
    """The first line of an exception message, trimmed: enough to act on, never a traceback."""
    text = str(err).strip()
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"missing key {err.args[0]!r}"
    first = text.splitlines()[0] if text else ""
    first = re.sub(r"\x1b\[[0-9;]*m", "", first)
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
