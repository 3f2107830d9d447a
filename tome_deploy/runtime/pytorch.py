"""The eager PyTorch runner every other runner is compared with (the lifecycle of runtime/base.py)."""

from __future__ import annotations

import numpy as np
import torch

from tome_deploy.runtime.base import Runner


class TorchRunner(Runner):
    """Eager PyTorch on CPU, fp32, no grad. The model is already in memory: activate puts it in eval mode."""

    name = "pytorch"

    def __init__(self, model: torch.nn.Module, input_name: str, output_name: str):
        super().__init__()
        self.model, self.input_name, self.output_name = model, input_name, output_name

    def _load(self) -> None:
        self.model.eval()

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.ascontiguousarray(feed[self.input_name])))
        return {self.output_name: out.float().numpy()}

    def _release(self) -> None:
        """The model belongs to the caller; nothing was loaded."""
