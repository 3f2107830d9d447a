"""The one place a runner is made: which runtime runs a file, by the name the commands take (`--runtime`).

Validation, serving, speed measurement and the benchmarks all get their runners from `open_runner`; each
runner comes back inactive (checked, nothing loaded), for the caller to use as `with runner:`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from tome_deploy.artifact.sidecar import is_engine_file
from tome_deploy.artifact.spec import OPENVINO_IR_SUFFIX
from tome_deploy.errors import InvalidInputError
from tome_deploy.runtime.base import Runner
from tome_deploy.runtime.onnxruntime import CPU_PROVIDERS, OnnxRuntimeRunner
from tome_deploy.runtime.openvino import OpenVINORunner

CPU_RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino")  # what runs an ONNX file (an engine runs in TensorRT)
RUNTIME_LABELS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


def open_runner(
    path: str | Path,
    runtime: str = "onnxruntime",
    *,
    providers: Sequence[str] = CPU_PROVIDERS,
    threads: int | None = None,
) -> Runner:
    """The inactive runner for `path`: a tome-build engine in TensorRT (MissingDependencyError without an
    importable TensorRT; an engine built for another TensorRT or GPU is refused), an OpenVINO IR (.xml) in
    OpenVINO, an ONNX file in `runtime`: ONNX Runtime with exactly `providers` active, or OpenVINO on CPU."""
    check_runtime(runtime)
    if is_engine_file(path):
        return _engine_runner(path, runtime, providers, threads)
    if runtime == "openvino" or Path(path).suffix.lower() == OPENVINO_IR_SUFFIX:
        if runtime != "openvino":
            raise InvalidInputError(f"{path} is an OpenVINO IR, which only OpenVINO runs; pass --runtime openvino")
        if tuple(providers) != CPU_PROVIDERS:
            raise InvalidInputError("--runtime openvino runs ONNX files on the CPU; drop --device/--providers")
        return OpenVINORunner(path, threads=threads)
    return OnnxRuntimeRunner(path, providers=providers, threads=threads)


def check_runtime(runtime: str) -> str:
    if runtime not in CPU_RUNTIMES:
        raise InvalidInputError(f"unknown runtime {runtime!r}; choose one of {', '.join(CPU_RUNTIMES)}")
    return runtime


def _engine_runner(path: str | Path, runtime: str, providers: Sequence[str], threads: int | None) -> Runner:
    if runtime != "onnxruntime":
        raise InvalidInputError(f"--runtime {runtime} runs ONNX files; an engine runs in TensorRT: drop --runtime")
    if tuple(providers) != CPU_PROVIDERS or threads:
        raise InvalidInputError(
            "--device, --providers and --threads apply to ONNX files; an engine runs on the GPU it was built for, drop them"
        )
    from tome_deploy.runtime.tensorrt import TensorRTRunner

    return TensorRTRunner(path)
