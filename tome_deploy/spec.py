"""The one declarative export spec, read by both the exporter and the validator so they cannot disagree,
and the metadata every tome-deploy ONNX file carries in `metadata_props`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from .errors import InvalidInputError

METADATA_PREFIX = "tome."

# scatter: ScatterElements(add). matmul: a one-hot matmul, no scatter op (runs on TensorRT / TensorRT-RTX).
MergeFormulation = Literal["scatter", "matmul"]
MERGE_FORMULATIONS: tuple[str, ...] = ("scatter", "matmul")


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
    atol: float = 1e-4
    rtol: float = 1e-3
    min_cosine: float = 0.99999

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
