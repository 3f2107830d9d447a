"""The eager PyTorch runner every other runner is compared with (the `Runner` protocol of runtime/base.py)."""

from __future__ import annotations

import numpy as np
import torch


class TorchRunner:
    """Eager PyTorch on CPU, fp32, no grad."""

    name = "pytorch"

    def __init__(self, model: torch.nn.Module, input_name: str, output_name: str):
        self.model, self.input_name, self.output_name = model.eval(), input_name, output_name

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(feed[self.input_name])))
        return {self.output_name: out.float().numpy()}
