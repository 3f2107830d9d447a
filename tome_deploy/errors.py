"""Typed errors. Each message names the problem and the fix; the CLI prints it as one line."""


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
