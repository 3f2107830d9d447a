"""One runner per backend, one protocol: `infer(dict of arrays) -> dict of arrays` (as in Polygraphy)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from .errors import InvalidInputError, MissingDependencyError


class Runner(Protocol):
    name: str

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class TorchRunner:
    """Eager PyTorch on CPU, fp32, no grad."""

    name = "pytorch"

    def __init__(self, model: torch.nn.Module, input_name: str, output_name: str):
        self.model, self.input_name, self.output_name = model.eval(), input_name, output_name

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(feed[self.input_name])))
        return {self.output_name: out.float().numpy()}


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
        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        active = self.session.get_providers()
        missing = [p for p in providers if p not in active]
        if missing:
            raise InvalidInputError(f"ONNX Runtime providers {missing} are not active (active: {active}); install the matching onnxruntime build")
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {name: feed[name] for name in self.input_names})
        return dict(zip(self.output_names, outputs))
