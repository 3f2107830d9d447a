"""The JSON written next to every engine (`model.plan` -> `model.plan.json`), and the checks that use it.

A serialized engine only runs on the TensorRT version and GPU it was built for, and its header is not
documented; the sidecar says what it was built with, so loading can refuse a mismatch with a clear
message before the runtime fails (or crashes) on it."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from tome_deploy.errors import InvalidInputError

SIDECAR_FORMAT = 1
ENGINE_SUFFIXES = (".plan", ".engine")


class EngineMismatchError(InvalidInputError):
    """An engine that cannot run here: corrupt, or built for another TensorRT or GPU."""


@dataclass(frozen=True)
class BatchProfile:
    input_name: str
    min: int
    opt: int
    max: int

    def check(self, batch: int) -> None:
        if not self.min <= batch <= self.max:
            raise InvalidInputError(
                f"batch {batch} is outside the engine's optimization profile ({self.min}..{self.max} for "
                f"{self.input_name}); rebuild with tome-build --min-batch/--max-batch covering it"
            )


@dataclass(frozen=True)
class EngineSidecar:
    backend: str  # "tensorrt" or "tensorrt-rtx"
    backend_version: str
    compute_capabilities: list[str]  # e.g. ["89"]: what the engine can run on
    profiles: list[BatchProfile]
    precision: str  # from the ONNX export: "fp32" or "fp16"
    input_name: str
    output_name: str
    input_shape: list[int]  # [C, H, W]
    output_shape: list[int]  # per image, e.g. [1000]: with the above, the engine's I/O needs no ONNX file
    onnx_path: str
    onnx_sha256: str
    plan_sha256: str
    plan_bytes: int
    tool_version: str
    tome: Optional[dict[str, Any]] = None  # the ONNX file's ToMe metadata; None for a non-tome-deploy graph
    warnings: list[str] = field(default_factory=list)
    format: int = SIDECAR_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, values: dict) -> "EngineSidecar":
        values = dict(values)
        values["profiles"] = [BatchProfile(**p) for p in values.get("profiles", [])]
        return cls(**values)

    def summary(self) -> str:
        lines = [
            f"backend      {self.backend} {self.backend_version}",
            f"runs on      compute capability {', '.join(self.compute_capabilities)}",
            f"precision    {self.precision}",
            f"input        {self.input_name} [batch, {', '.join(map(str, self.input_shape))}] -> "
            f"{self.output_name} [batch, {', '.join(map(str, self.output_shape))}]",
        ]
        lines += [f"profile      {p.input_name}: batch min {p.min}, opt {p.opt}, max {p.max}" for p in self.profiles]
        lines.append(f"onnx         {self.onnx_path} (sha256 {self.onnx_sha256[:16]}...)")
        lines.append(f"engine       {self.plan_bytes} bytes, sha256 {self.plan_sha256[:16]}...")
        if self.tome is None:
            lines.append("tome         no ToMe schedule known (the ONNX file is not a tome-deploy export)")
        else:
            lines.append(f"tome         {self.tome['model']}, r per layer {self.tome['r_effective']}, merge={self.tome['merge']}")
            lines.append(f"tokens       {self.tome['tokens_per_layer']}")
        lines += [f"warning      {w}" for w in self.warnings]
        return "\n".join(lines)


def sidecar_path(plan: str | Path) -> Path:
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def is_engine_file(path: str | Path) -> bool:
    """A tome-build engine: a .plan/.engine file, or any file with a sidecar next to it."""
    path = Path(path)
    return path.suffix.lower() in ENGINE_SUFFIXES or sidecar_path(path).is_file()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_sidecar(plan: str | Path) -> EngineSidecar:
    """The sidecar of `plan`, after checking that the engine file is the one it describes."""
    plan, path = Path(plan), sidecar_path(plan)
    if not plan.is_file():
        raise InvalidInputError(f"no such engine file: {plan}")
    if not path.is_file():
        raise EngineMismatchError(f"{plan} has no sidecar {path.name}; rebuild it with tome-build, which writes one")
    try:
        sidecar = EngineSidecar.from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise EngineMismatchError(f"{path} is not a tome-build sidecar ({err}); rebuild the engine with tome-build") from err
    size = plan.stat().st_size
    if size != sidecar.plan_bytes or file_sha256(plan) != sidecar.plan_sha256:
        raise EngineMismatchError(
            f"{plan} is corrupt or truncated ({size} bytes, the build wrote {sidecar.plan_bytes} with another "
            "checksum); rebuild it with tome-build"
        )
    return sidecar


def check_runs_here(sidecar: EngineSidecar, backend_name: str, backend_version: str, gpu_capability: Optional[str]) -> None:
    """Refuse an engine built by another TensorRT or for another GPU than the installed ones."""
    if (sidecar.backend, sidecar.backend_version) != (backend_name, backend_version):
        raise EngineMismatchError(
            f"the engine was built by {sidecar.backend} {sidecar.backend_version} but {backend_name} "
            f"{backend_version} is installed; rebuild it here with tome-build (engines are not portable across versions)"
        )
    if gpu_capability is None:
        raise EngineMismatchError(
            f"the engine needs a CUDA GPU (compute capability {', '.join(sidecar.compute_capabilities)}) and none is "
            "visible; run it on such a machine, or validate the ONNX file with ONNX Runtime instead"
        )
    if gpu_capability not in sidecar.compute_capabilities:
        raise EngineMismatchError(
            f"the engine was built for compute capability {', '.join(sidecar.compute_capabilities)} but this GPU is "
            f"{gpu_capability}; rebuild with tome-build --compute-capability {gpu_capability} (or on this machine)"
        )
