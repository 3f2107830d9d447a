"""ONNX Runtime behind the runner lifecycle (runtime/base.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tome_deploy.errors import (
    InvalidInputError,
    MissingDependencyError,
    ToMeError,
    error_reason,
)
from tome_deploy.runtime.base import Runner
from tome_deploy.token_merge.ort_op import session_model

CPU_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)


class OnnxRuntimeRunner(Runner):
    """ONNX Runtime; CPU unless other providers are asked for, and then they must really be active."""

    name = "onnxruntime"

    def __init__(self, path: str | Path, providers: Sequence[str] = CPU_PROVIDERS, threads: int | None = None):
        super().__init__()
        self.path, self.providers, self.threads = path, tuple(providers), threads
        self.session: Any = None  # onnxruntime.InferenceSession while active
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    def _load(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError as err:
            raise MissingDependencyError("onnxruntime is not installed: pip install onnxruntime") from err
        options = ort.SessionOptions()
        if self.threads:
            options.intra_op_num_threads = self.threads
        # Graphs with tome::TokenMerge nodes (--merge plugin) get the op registered (onnxruntime-extensions).
        try:
            session = ort.InferenceSession(session_model(self.path, options), options, providers=list(self.providers))
        except Exception as err:
            if isinstance(err, ToMeError):
                raise
            raise InvalidInputError(
                f"ONNX Runtime cannot load {self.path} ({error_reason(err)}); re-export it with tome-export"
            ) from err
        active = session.get_providers()
        missing = [p for p in self.providers if p not in active]
        if missing:
            raise InvalidInputError(
                f"ONNX Runtime providers {missing} are not active (active: {active}); install the matching onnxruntime build"
            )
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {name: feed[name] for name in self.input_names})
        return dict(zip(self.output_names, outputs))

    def _release(self) -> None:
        self.session = None
