"""Export precision: the ToMe model run in fp16 with fp32 inputs and outputs.

Only the weights and activations become fp16. The merge math casts itself up: the metric is normalised
and scored in fp32 (`bipartite_match`), sizes are fp32, so `log(size)` and the size-weighted average are
computed in fp32 and only their results are cast back (docs/design.md#precision: the sum of squares
overflows fp16).
TensorRT 11 and TensorRT-RTX build strongly typed networks, so this is where fp16 has to come from."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tome_deploy.artifact.spec import PRECISIONS
from tome_deploy.errors import InvalidInputError


class Float16Compute(nn.Module):
    """Wraps a model: fp32 pixels in, fp16 inside, fp32 logits out (callers and runners stay fp32)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.half()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels.half()).float()


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidInputError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def with_precision(tome_model: nn.Module, precision: str) -> nn.Module:
    """The module to export and to validate against for `precision`; `tome_model` itself is not changed.
    bf16 and int8 export the fp32 model: the runtime's file gets its precision after the export (an IR's
    bf16 types, the runtime's int8 quantizer), and validation compares it with the fp32 model."""
    if check_precision(precision) != "fp16":
        return tome_model
    return Float16Compute(copy.deepcopy(tome_model)).eval()
