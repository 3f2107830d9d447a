"""Which TensorRT is installed: full TensorRT (`tensorrt`, 10.x / 11.x) or TensorRT-RTX (`tensorrt_rtx_bindings`).

Both share the builder / parser / runtime API; they differ in what a build may ask for. Imported lazily:
nothing here loads a TensorRT library until a backend is actually requested."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Optional

from tome_deploy.errors import InvalidInputError, MissingDependencyError

BACKENDS: tuple[str, ...] = ("tensorrt", "tensorrt-rtx")
_MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
_INSTALL = {
    "tensorrt": "pip install tensorrt --extra-index-url https://pypi.nvidia.com (NVIDIA's index)",
    "tensorrt-rtx": "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings",
}


@dataclass(frozen=True)
class TensorRTBackend:
    name: str  # "tensorrt" or "tensorrt-rtx"
    trt: Any  # the imported module
    version: str

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def builds_ahead_of_time(self) -> bool:
        """TensorRT-RTX can build for a named compute capability without that GPU (or any GPU)."""
        return self.name == "tensorrt-rtx"

    @property
    def runs_scatter_reduction(self) -> bool:
        """Full TensorRT routes ScatterElements(add) to NVIDIA's plugin; TensorRT-RTX's parser rejects it."""
        return self.name == "tensorrt"

    @property
    def has_timing_cache(self) -> bool:
        """TensorRT-RTX picks kernels at run time; its timing-cache calls are no-ops."""
        return self.name == "tensorrt"

    @property
    def runs_python_plugins(self) -> bool:
        """`tensorrt.plugin` (QDP, AOT kernels) exists only in full TensorRT >= 10.9."""
        return self.name == "tensorrt"

    def compute_capability_enum(self, capability: str) -> Any:
        """'89' or 'sm89' -> trt.ComputeCapability.SM89 (TensorRT-RTX only)."""
        members = self.trt.ComputeCapability.__members__
        key = "SM" + capability.lower().removeprefix("sm").replace(".", "")
        if key not in members or key in ("SMNONE", "SMCURRENT"):
            offered = ", ".join(m.removeprefix("SM") for m in members if m.startswith("SM"))
            raise InvalidInputError(
                f"--compute-capability {capability} is not offered by {self.name} {self.version}; choose one of {offered}"
            )
        return members[key]


def load_backend(name: Optional[str] = None) -> TensorRTBackend:
    """The named backend, or (name None / "auto") full TensorRT if importable, else TensorRT-RTX."""
    if name not in (None, "auto", *BACKENDS):
        raise InvalidInputError(f"unknown --backend {name!r}; choose auto, {' or '.join(BACKENDS)}")
    candidates = BACKENDS if name in (None, "auto") else (name,)
    errors = []
    for candidate in candidates:
        try:
            module = importlib.import_module(_MODULES[candidate])
        except ImportError as err:
            errors.append(f"{candidate}: {err}")
            continue
        return TensorRTBackend(candidate, module, str(module.__version__))
    install = "; or ".join(_INSTALL[c] for c in candidates)
    raise MissingDependencyError(f"no TensorRT backend is importable ({'; '.join(errors)}); install one: {install}")


def local_compute_capability() -> Optional[str]:
    """'89' for the first CUDA GPU, None when there is none (torch answers without a TensorRT import)."""
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}{minor}"
