"""The one runner protocol, `infer(dict of arrays) -> dict of arrays` (as in Polygraphy). Imports no torch:
the runners live one per backend next to it (pytorch.py, onnxruntime.py; TensorRT in tensorrt/runner.py)."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    name: str

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
