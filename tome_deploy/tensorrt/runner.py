"""A TensorRT / TensorRT-RTX engine behind the runner protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tome_deploy.errors import InvalidInputError


class TensorRTRunner:
    """A TensorRT or TensorRT-RTX engine built by tome-build; device buffers are torch CUDA tensors.

    The sidecar is checked first (file intact, same TensorRT, a GPU of the built compute capability), so a
    mismatched engine fails with a message instead of inside the runtime.
    """

    def __init__(self, plan: str | Path):
        from tome_deploy.artifact.formulations import formulation_named
        from tome_deploy.artifact.sidecar import (
            EngineMismatchError,
            check_runs_here,
            read_sidecar,
        )
        from tome_deploy.tensorrt.backend import load_backend, local_compute_capability

        self.sidecar = read_sidecar(plan)
        backend = load_backend(self.sidecar.backend)
        check_runs_here(self.sidecar, backend.name, backend.version, local_compute_capability())
        self.trt, self.name = backend.trt, backend.name
        if self.sidecar.tome is not None:  # e.g. the plugin formulation registers its TensorRT plugin
            formulation_named(self.sidecar.tome.merge).prepare_runtime("tensorrt")
        self._logger = self.trt.Logger(self.trt.Logger.WARNING)
        if backend.runs_scatter_reduction:  # engines of `scatter` graphs use NVIDIA's ScatterElements plugin
            self.trt.init_libnvinfer_plugins(self._logger, "")
        self.engine = self.trt.Runtime(self._logger).deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise EngineMismatchError(f"{backend.name} {backend.version} could not load {plan}; rebuild it with tome-build")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.OUTPUT]

    def _torch_dtype(self, name: str) -> torch.dtype:
        dtypes = {self.trt.DataType.FLOAT: torch.float32, self.trt.DataType.HALF: torch.float16}
        return dtypes[self.engine.get_tensor_dtype(name)]

    def bind(self, device_input: torch.Tensor) -> dict[str, torch.Tensor]:
        """Point the engine at `device_input` and at new output buffers for its batch; returns the outputs.
        The caller keeps every buffer alive while the engine runs on it."""
        name = self.sidecar.input_name
        self.context.set_input_shape(name, tuple(device_input.shape))
        self.context.set_tensor_address(name, device_input.data_ptr())
        outputs = {}
        for output in self.output_names:
            buffer = torch.empty(tuple(self.context.get_tensor_shape(output)), dtype=self._torch_dtype(output), device="cuda")
            self.context.set_tensor_address(output, buffer.data_ptr())
            outputs[output] = buffer
        return outputs

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = self.sidecar.input_name
        pixels = np.asarray(feed[name])
        if list(pixels.shape[1:]) != self.sidecar.input_shape:
            raise InvalidInputError(f"{name} must be [batch, {', '.join(map(str, self.sidecar.input_shape))}], got {list(pixels.shape)}")
        self.sidecar.profiles[0].check(pixels.shape[0])
        device_input = torch.from_numpy(np.ascontiguousarray(pixels)).to("cuda", self._torch_dtype(name))
        outputs = self.bind(device_input)
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.name} failed to run the engine (see the TensorRT log above)")
        stream.synchronize()
        return {output: buffer.float().cpu().numpy() for output, buffer in outputs.items()}
