"""The one declarative export spec, read by both the exporter and the validator so they cannot disagree,
and the metadata every tome-deploy ONNX file carries in `metadata_props`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import InvalidInputError

METADATA_PREFIX = "tome."

# scatter: ScatterElements(add). matmul: a one-hot matmul, no scatter op (runs on TensorRT / TensorRT-RTX).
# plugin: one fused tome::TokenMerge node per block (tome_deploy/token_merge; needs the `plugin` extra to run).
MergeFormulation = Literal["scatter", "matmul", "plugin"]
MERGE_FORMULATIONS: tuple[str, ...] = ("scatter", "matmul", "plugin")

# Where the export will run. tensorrt: a merge formulation TensorRT and TensorRT-RTX parse natively.
TARGETS: tuple[str, ...] = ("onnxruntime", "tensorrt")
TARGET_DEFAULT_MERGE = {"onnxruntime": "scatter", "tensorrt": "matmul"}
TARGET_REFUSED_MERGES = {"onnxruntime": (), "tensorrt": ("scatter",)}
# fp16: weights and activations in fp16, inputs/outputs fp32; matching and log(size) stay fp32.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")


@dataclass(frozen=True)
class Tolerance:
    """One parity budget: |diff| <= atol + rtol * |ref| everywhere and cosine >= min_cosine."""

    atol: float
    rtol: float
    min_cosine: float


def merge_for_target(merge: str | None, target: str) -> str:
    """The merge formulation an export for `target` uses; refuses one that `target` cannot run."""
    if target not in TARGETS:
        raise InvalidInputError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    if merge is None:
        return TARGET_DEFAULT_MERGE[target]
    if merge in TARGET_REFUSED_MERGES[target]:
        raise InvalidInputError(
            f"--merge {merge} cannot run on {target}: ScatterElements(add) is not a native TensorRT op "
            "(TensorRT-RTX rejects it, TensorRT sums it with nondeterministic atomics); "
            f"drop --merge (--target {target} picks {TARGET_DEFAULT_MERGE[target]}) or pass --merge matmul"
        )
    return merge


@dataclass(frozen=True)
class ExportSpec:
    input_name: str = "pixel_values"
    output_name: str = "logits"
    batch_axis_name: str = "batch"
    default_opset: int = 18
    # ScatterElements(reduction="add") exists from opset 16; below it the sum is silently dropped.
    min_opset: int = 16
    # The exporter only targets opsets the ONNX checker and ONNX Runtime 1.2x both know.
    max_opset: int = 22
    fp32: Tolerance = Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.99999)
    # fp16 export vs the same model run by PyTorch in fp16: kernels round differently in the last bits.
    fp16: Tolerance = Tolerance(atol=2e-2, rtol=2e-2, min_cosine=0.999)

    def tolerance(self, precision: str) -> Tolerance:
        return self.fp16 if precision == "fp16" else self.fp32

    def check_opset(self, opset: int) -> int:
        if not self.min_opset <= opset <= self.max_opset:
            raise InvalidInputError(
                f"opset {opset} is not supported: ToMe's summed merge needs opset >= {self.min_opset} "
                f"(below it ScatterElements drops the reduction and gives wrong results); "
                f"pass --opset between {self.min_opset} and {self.max_opset} (default {self.default_opset})"
            )
        return opset


EXPORT_SPEC = ExportSpec()


@dataclass(frozen=True)
class ToMeMetadata:
    """What an export records about itself; enough to rebuild the same PyTorch model for validation."""

    tool_version: str
    model: str  # timm architecture name
    weights: str  # human description of where the weights came from
    weights_sha256: str
    input_size: list[int]  # [3, H, W]
    mean: list[float]
    std: list[float]
    interpolation: str
    crop_pct: float
    merge: str
    opset: int
    batch: str  # "dynamic" or the fixed batch size
    schedule: Any  # the schedule as requested: int, [r, inflect] or per-layer list
    r_requested: list[int]
    r_effective: list[int]
    tokens_per_layer: list[int]
    num_prefix_tokens: int
    theoretical_speedup: float
    input_name: str = EXPORT_SPEC.input_name
    output_name: str = EXPORT_SPEC.output_name
    precision: str = "fp32"
    target: str = "onnxruntime"
    extra: dict = field(default_factory=dict)

    def to_props(self) -> dict[str, str]:
        return {METADATA_PREFIX + key: json.dumps(value) for key, value in asdict(self).items()}

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ToMeMetadata | None":
        """None when the props are not a tome-deploy export's."""
        values = {}
        for f in fields(cls):
            raw = props.get(METADATA_PREFIX + f.name)
            if raw is not None:
                values[f.name] = json.loads(raw)
        try:
            return cls(**values)
        except TypeError:
            return None
