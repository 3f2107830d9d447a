"""The CPU runtimes an ONNX export runs in, by the name the commands take (`--runtime`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tome_deploy.errors import InvalidInputError

if TYPE_CHECKING:
    from tome_deploy.runtime.base import Runner

CPU_RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino")
RUNTIME_LABELS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


def cpu_runner(runtime: str, path: str | Path, threads: int | None = None) -> "Runner":
    """A runner for an ONNX file on CPU in `runtime`; MissingDependencyError when it is not installed."""
    if check_runtime(runtime) == "onnxruntime":
        from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(path, threads=threads)
    from tome_deploy.runtime.openvino import OpenVINORunner

    return OpenVINORunner(path, threads=threads)


def check_runtime(runtime: str) -> str:
    if runtime not in CPU_RUNTIMES:
        raise InvalidInputError(f"unknown runtime {runtime!r}; choose one of {', '.join(CPU_RUNTIMES)}")
    return runtime
