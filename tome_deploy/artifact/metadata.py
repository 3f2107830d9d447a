"""The ToMe metadata every tome-deploy ONNX file carries in `metadata_props` (keys `tome.*`). Imports no torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tome_deploy.artifact.spec import EXPORT_SPEC

METADATA_PREFIX = "tome."


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
