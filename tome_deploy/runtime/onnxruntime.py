"""ONNX Runtime behind the runner protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from tome_deploy.errors import (
    InvalidInputError,
    MissingDependencyError,
    ToMeError,
    error_reason,
)
from tome_deploy.token_merge.ort_op import session_model


class OnnxRuntimeRunner:
    """ONNX Runtime; CPU unless other providers are asked for, and then they must really be active."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime") from err
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Graphs with tome::TokenMerge nodes (--merge plugin) get the op registered (onnxruntime-extensions).
        try:
            self.session = ort.InferenceSession(session_model(path, options), options, providers=list(providers))
        except Exception as err:  # noqa: BLE001 - InvalidGraph, Fail, NoSuchFile, ... from the C++ side
            if isinstance(err, ToMeError):
                raise
            raise InvalidInputError(f"ONNX Runtime cannot load {path} ({error_reason(err)}); re-export it with "
                                    "tome-export") from err
        active = self.session.get_providers()
        missing = [p for p in providers if p not in active]
        if missing:
            raise InvalidInputError(f"ONNX Runtime providers {missing} are not active (active: {active}); install the matching onnxruntime build")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {name: feed[name] for name in self.input_names})
        return dict(zip(self.output_names, outputs))
