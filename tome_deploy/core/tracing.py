"""Whether onnx_export is tracing a model: the few core functions that export differently from how they run
eagerly (gather_tokens as one GatherND, attention as MatMul/Softmax) read this one flag."""

from __future__ import annotations

import contextlib

_TRACING = [False]  # set only inside onnx_export_tracing()


def exporting_onnx() -> bool:
    return _TRACING[0]


@contextlib.contextmanager
def onnx_export_tracing():
    """While onnx_export traces a model: core functions take their export form (static shapes)."""
    previous = _TRACING[0]
    _TRACING[0] = True
    try:
        yield
    finally:
        _TRACING[0] = previous
