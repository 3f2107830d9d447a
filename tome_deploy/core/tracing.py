"""Whether onnx_export is tracing a model: the few core functions that export differently from how they run
eagerly (gather_tokens as one GatherND, the scatter sums as ScatterND on whole rows, attention as MatMul/Softmax,
the score order as TopK) read these flags."""

from __future__ import annotations

import contextlib

# Set only inside onnx_export_tracing(): [tracing, TopK orders ties by the lower index].
_TRACING = [False, False]


def exporting_onnx() -> bool:
    return _TRACING[0]


def topk_orders_ties() -> bool:
    """True while exporting for a runtime whose TopK follows the ONNX spec on ties (the lower index first:
    ONNX Runtime, OpenVINO); False eagerly and for TensorRT, which documents no tie order."""
    return _TRACING[0] and _TRACING[1]


@contextlib.contextmanager
def onnx_export_tracing(topk_ties: bool = False):
    """While onnx_export traces a model: core functions take their export form (static shapes);
    topk_ties: the target runtime's TopK orders ties by the lower index, as the ONNX spec says."""
    previous = list(_TRACING)
    _TRACING[:] = [True, topk_ties]
    try:
        yield
    finally:
        _TRACING[:] = previous
