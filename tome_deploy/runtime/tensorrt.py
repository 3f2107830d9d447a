"""A TensorRT / TensorRT-RTX engine behind the runner lifecycle (runtime/base.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from tome_deploy.artifact.formulations import formulation_named
from tome_deploy.artifact.sidecar import (
    EngineMismatchError,
    check_runs_here,
    read_sidecar,
)
from tome_deploy.errors import InvalidInputError
from tome_deploy.runtime.base import Runner
from tome_deploy.runtime.tensorrt_backend import load_backend, local_compute_capability


class TensorRTRunner(Runner):
    """A TensorRT or TensorRT-RTX engine built by tome-build; device buffers are torch CUDA tensors.

    The constructor checks the sidecar (file intact, same TensorRT, a GPU of the built compute capability),
    so a mismatched engine fails with a message instead of inside the runtime; activate deserializes it.
    """

    def __init__(self, plan: str | Path):
        super().__init__()
        self.plan = Path(plan)
        self.sidecar = read_sidecar(plan)
        self.backend = load_backend(self.sidecar.backend)
        check_runs_here(self.sidecar, self.backend.name, self.backend.version, local_compute_capability())
        self.trt, self.name = self.backend.trt, self.backend.name
        self.engine: Any = None  # trt.ICudaEngine while active
        self.context: Any = None  # its IExecutionContext
        self.output_names: list[str] = []

    def _load(self) -> None:
        if self.sidecar.tome is not None:  # e.g. the plugin formulation registers its TensorRT plugin
            formulation_named(self.sidecar.tome.merge).prepare_runtime("tensorrt")
        logger = self.trt.Logger(self.trt.Logger.WARNING)
        if self.backend.runs_scatter_reduction:  # engines of `scatter` graphs use NVIDIA's ScatterElements plugin
            self.trt.init_libnvinfer_plugins(logger, "")
        engine = self.trt.Runtime(logger).deserialize_cuda_engine(self.plan.read_bytes())
        if engine is None:
            raise EngineMismatchError(
                f"{self.backend.name} {self.backend.version} could not load {self.plan}; rebuild it with tome-build"
            )
        self.engine, self.context = engine, engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.OUTPUT]

    def _release(self) -> None:
        self.context = None
        self.engine = None

    def _torch_dtype(self, name: str) -> torch.dtype:
        dtypes = {self.trt.DataType.FLOAT: torch.float32, self.trt.DataType.HALF: torch.float16}
        return dtypes[self.engine.get_tensor_dtype(name)]

    def bind(self, device_input: torch.Tensor) -> dict[str, torch.Tensor]:
        """Point the active engine at `device_input` and at new output buffers for its batch; returns the
        outputs. The caller keeps every buffer alive while the engine runs on it."""
        name = self.sidecar.input_name
        self.context.set_input_shape(name, tuple(device_input.shape))
        self.context.set_tensor_address(name, device_input.data_ptr())
        outputs = {}
        for output in self.output_names:
            buffer = torch.empty(
                tuple(self.context.get_tensor_shape(output)), dtype=self._torch_dtype(output), device="cuda"
            )
            self.context.set_tensor_address(output, buffer.data_ptr())
            outputs[output] = buffer
        return outputs

    def enqueue(self) -> None:
        """Queue one pass of the bound engine on the current CUDA stream, without waiting for it."""
        if not self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError(f"{self.name} failed to run the engine (see the TensorRT log above)")

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = self.sidecar.input_name
        pixels = np.asarray(feed[name])
        if list(pixels.shape[1:]) != self.sidecar.input_shape:
            raise InvalidInputError(
                f"{name} must be [batch, {', '.join(map(str, self.sidecar.input_shape))}], got {list(pixels.shape)}"
            )
        self.sidecar.profiles[0].check(pixels.shape[0])
        device_input = torch.from_numpy(np.ascontiguousarray(pixels)).to("cuda", self._torch_dtype(name))
        outputs = self.bind(device_input)
        self.enqueue()
        torch.cuda.current_stream().synchronize()
        return {output: buffer.float().cpu().numpy() for output, buffer in outputs.items()}
