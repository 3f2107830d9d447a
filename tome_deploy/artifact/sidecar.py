"""The JSON written next to every engine (`model.plan` -> `model.plan.json`), and the checks that use it.

A serialized engine only runs on the TensorRT version and GPU it was built for, and its header is not
documented; the sidecar says what it was built with, so loading can refuse a mismatch with a clear
message before the runtime fails (or crashes) on it."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from tome_deploy.artifact import checks
from tome_deploy.artifact.checks import FieldError
from tome_deploy.artifact.input_spec import sample_shape
from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.spec import EXPORT_SPEC
from tome_deploy.errors import InvalidInputError

# 1: tome-deploy 0.1.0 (the version under the key "format"); 2: this one ("schema_version", typed checks).
SIDECAR_SCHEMA_VERSION = 2
ENGINE_SUFFIXES = (".plan", ".engine")
BACKENDS = ("tensorrt", "tensorrt-rtx")
ENGINE_PRECISIONS = ("fp32", "fp16", "bf16")  # bf16: a graph without ToMe metadata whose weights are bf16


class EngineMismatchError(InvalidInputError):
    """An engine that cannot run here: corrupt, or built for another TensorRT or GPU."""


class SidecarError(EngineMismatchError):
    """A sidecar that is damaged: not JSON, a wrong type or bound, or a key missing."""


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


@dataclass(frozen=True, kw_only=True)
class EngineSidecar:
    backend: str  # one of BACKENDS
    backend_version: str
    compute_capabilities: list[str]  # e.g. ["89"]: what the engine can run on
    profiles: list[BatchProfile]  # at least one
    precision: str  # from the ONNX export: "fp32" or "fp16"
    input_name: str
    output_name: str
    input_shape: list[int]  # one sample, after the batch axis: the input spec's shape, e.g. [C, H, W]
    output_shape: list[int]  # per image, e.g. [1000]: with the above, the engine's I/O needs no ONNX file
    onnx_path: str
    onnx_sha256: str
    plan_sha256: str
    plan_bytes: int
    tool_version: str
    tome: Optional[ToMeMetadata] = None  # the ONNX file's ToMe metadata; None for a non-tome-deploy graph
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        values = {"schema_version": SIDECAR_SCHEMA_VERSION, **asdict(self)}
        values["tome"] = self.tome.to_dict() if self.tome is not None else None
        return values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, values: Any, source: str) -> EngineSidecar:
        """Typed and checked from JSON (version 1 or 2); FieldError for a damaged value, NewerSchemaError for a newer schema."""
        if not isinstance(values, dict):
            raise FieldError(f"must hold a JSON object, got {type(values).__name__}")
        # Versions 1 and 2 hold the same keys; 2 is read with the checks below, and so is 1.
        checks.checked(
            "'schema_version'",
            lambda v: checks.schema_version(v, SIDECAR_SCHEMA_VERSION, "sidecar", source),
            values.get("schema_version", values.get("format", 1)),
        )
        missing = [f.name for f in fields(cls) if f.name not in values and f.name not in ("tome", "warnings")]
        if missing:
            raise FieldError(f"'{missing[0]}' is missing")
        typed = {
            name: checks.checked(f"'{name}'", reader, values[name])
            for name, reader in _READERS.items()
            if name in values
        }
        if values.get("tome") is not None:
            typed["tome"] = ToMeMetadata.from_dict(checks.checked("'tome'", _mapping, values["tome"]), source)
        return cls(**typed)

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
            lines.append(
                f"tome         {self.tome.model}, r per layer {self.tome.r_effective}, merge={self.tome.merge}"
            )
            lines.append(f"tokens       {self.tome.tokens_per_layer}")
        lines += [f"warning      {w}" for w in self.warnings]
        return "\n".join(lines)


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise FieldError(f"must be a JSON object or null, got {type(value).__name__}")
    return value


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise FieldError(f"must be 64 hex digits, got {value!r:.40}")
    return value


def _capability(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]{2,4}", value):
        raise FieldError(f'must be a compute capability such as "89", got {value!r:.40}')
    return value


def _profile(value: Any) -> BatchProfile:
    value = _mapping(value)
    try:
        profile = BatchProfile(
            checks.text(value.get("input_name")),
            *(checks.whole(value.get(key), 1, EXPORT_SPEC.max_batch) for key in ("min", "opt", "max")),
        )
    except FieldError as err:
        raise FieldError(
            f"must be {{input_name, min, opt, max}} with batches from 1 to {EXPORT_SPEC.max_batch} ({err})"
        ) from None
    if not profile.min <= profile.opt <= profile.max:
        raise FieldError(f"must have min <= opt <= max, got {profile.min}, {profile.opt}, {profile.max}")
    return profile


def _profiles(value: Any) -> list[BatchProfile]:
    profiles = checks.each(_profile, value)
    if not profiles:
        raise FieldError("must hold at least one optimization profile")
    return profiles


# key -> reader of its JSON value
_READERS = {
    "backend": lambda v: checks.one_of(v, BACKENDS),
    "backend_version": checks.text,
    "compute_capabilities": lambda v: checks.each(_capability, v),
    "profiles": _profiles,
    "precision": lambda v: checks.one_of(v, ENGINE_PRECISIONS),
    "input_name": checks.text,
    "output_name": checks.text,
    "input_shape": sample_shape,
    "output_shape": lambda v: checks.each(checks.whole, v, 1, 1 << 24),
    "onnx_path": checks.text,
    "onnx_sha256": _sha256,
    "plan_sha256": _sha256,
    "plan_bytes": lambda v: checks.whole(v, 1, 1 << 40),
    "tool_version": checks.text,
    "warnings": lambda v: checks.each(lambda w: checks.text(w, empty=True), v),
}


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
        values = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise SidecarError(
            f"{path} is not a tome-build sidecar (not JSON: {err}); rebuild the engine with tome-build"
        ) from None
    try:
        sidecar = EngineSidecar.from_dict(values, str(path))
    except FieldError as err:
        raise SidecarError(f"{path}: {err}; rebuild the engine with tome-build") from None
    size = plan.stat().st_size
    if size != sidecar.plan_bytes or file_sha256(plan) != sidecar.plan_sha256:
        raise EngineMismatchError(
            f"{plan} is corrupt or truncated ({size} bytes, the build wrote {sidecar.plan_bytes} with another "
            "checksum); rebuild it with tome-build"
        )
    return sidecar


def check_runs_here(
    sidecar: EngineSidecar, backend_name: str, backend_version: str, gpu_capability: Optional[str]
) -> None:
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
