"""A tome-deploy artifact as a Triton Python-backend model: Triton batches, our runner computes.

`tome-deploy triton-repo ARTIFACT DIR --backend python` writes DIR/<name>/1/model.py (the few lines in
`MODEL_PY`, which import `TritonPythonModel` from here) next to DIR/<name>/1/model.onnx. Triton's
dynamic batcher hands `execute` several requests at once; their rows run as one model call through the
same ONNX Runtime runner `tome-serve` uses, and every request gets back exactly its own rows.

Only Triton's Python-backend stub imports this module (`triton_python_backend_utils` exists only there).
The stub runs with Python's environment variables ignored (PYTHONPATH has no effect), so model.py puts
the folders of $TOME_DEPLOY_PYTHONPATH on sys.path before importing tome_deploy: for a source checkout.

Tensors cross the stub through DLPack (`np.from_dlpack`, `Tensor.from_dlpack`), not `as_numpy()` /
`Tensor(name, array)`: measured with the stub of nvidia-pytriton 0.7.0 under numpy 2, those two read and
write wrong bytes (a constant input row, empty outputs), while the DLPack path is exact under numpy 1 and 2.
The stub then renames the consumed capsule, and numpy's capsule destructor reports a harmless
"PyCapsule_GetPointer called with incorrect name" for each output; `_quiet_capsule_rename` drops exactly that.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np

from tome_deploy.runtime.factory import open_runner
from tome_deploy.serving.batcher import concatenate, split
from tome_deploy.serving.served_model import read_served_model, run_padded

THREADS_PARAMETER = "tome.threads"  # ONNX Runtime intra-op threads per model instance (absent: all cores)

MODEL_PY = '''"""Triton Python-backend entry point of a tome-deploy model (written by tome-deploy triton-repo --backend python).

Runs model.onnx next to this file through tome-deploy's ONNX Runtime runner. Triton's Python stub ignores
PYTHONPATH: install tome-deploy into the Python the stub runs, or list a checkout in $TOME_DEPLOY_PYTHONPATH.
"""

import os
import sys

sys.path[:0] = [entry for entry in os.environ.get("TOME_DEPLOY_PYTHONPATH", "").split(os.pathsep) if entry]

from tome_deploy.serving.triton_python import TritonPythonModel  # noqa: E402,F401
'''


def _parameters(model_config: dict) -> dict[str, str]:
    return {key: value.get("string_value", "") for key, value in model_config.get("parameters", {}).items()}


def _threads(parameters: dict[str, str]) -> Optional[int]:
    text = parameters.get(THREADS_PARAMETER)
    return int(text) if text else None


def _non_finite(name: str, array: np.ndarray) -> Optional[str]:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        return f"input {name!r} has {bad} non-finite values (NaN or inf); send finite, normalised pixels"
    return None


def _quiet_capsule_rename(args, default=sys.unraisablehook) -> None:
    if isinstance(args.exc_value, ValueError) and "PyCapsule_GetPointer called with incorrect name" in str(
        args.exc_value
    ):
        return
    default(args)


class TritonPythonModel:
    """The class Triton's Python backend instantiates once per model instance."""

    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        sys.unraisablehook = _quiet_capsule_rename
        config = json.loads(args["model_config"])
        folder = Path(args["model_repository"]) / args["model_version"]
        onnx_files = sorted(folder.glob("*.onnx"))
        if len(onnx_files) != 1:
            raise pb_utils.TritonModelException(
                f"{folder} must hold exactly one .onnx file next to model.py, found {len(onnx_files)}; rewrite it with tome-deploy triton-repo --backend python"
            )
        self.served_model = read_served_model(onnx_files[0])
        self.runner = open_runner(self.served_model.path, threads=_threads(_parameters(config)))
        self.runner.activate()
        self.input_name, self.output_name = self.served_model.model_input.name, self.served_model.outputs[0].name

    def execute(self, requests: list) -> list:
        """k requests of [n_i, ...] rows -> one model call on [sum n_i, ...] -> k responses of their own rows."""
        feeds, responses = [], [None] * len(requests)
        for index, request in enumerate(requests):
            array = np.from_dlpack(self.pb.get_input_tensor_by_name(request, self.input_name))
            problem = _non_finite(self.input_name, array)
            if problem:
                responses[index] = self._error(problem, self.pb.TritonError.INVALID_ARG)
            else:
                feeds.append((index, {self.input_name: array}))
        if feeds:
            try:
                outputs = run_padded(self.runner, self.served_model, concatenate([feed for _, feed in feeds]))
                parts: list[Optional[dict[str, np.ndarray]]] = list(
                    split(outputs, [len(feed[self.input_name]) for _, feed in feeds])
                )
            except Exception as err:  # noqa: BLE001 - the runner's error types vary by backend
                message = f"the model failed on a batch of {sum(len(f[self.input_name]) for _, f in feeds)}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
                parts = [None] * len(feeds)
                for index, _ in feeds:
                    responses[index] = self._error(message, self.pb.TritonError.INTERNAL)
            for (index, _), part in zip(feeds, parts):
                if part is not None:
                    output = np.ascontiguousarray(part[self.output_name])
                    responses[index] = self.pb.InferenceResponse([self.pb.Tensor.from_dlpack(self.output_name, output)])
        return responses

    def _error(self, message: str, code):
        return self.pb.InferenceResponse(error=self.pb.TritonError(message, code))

    def finalize(self) -> None:
        self.runner.deactivate()
