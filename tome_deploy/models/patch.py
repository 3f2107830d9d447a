"""apply_tome: a ToMe copy of any model a family adapter (models/adapter.py) accepts, and source tracking."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from tome_deploy.artifact.formulations import MergeFormulation, get_formulation
from tome_deploy.core.schedule import RSpec, Schedule, resolve_schedule
from tome_deploy.errors import InvalidInputError
from tome_deploy.models.adapter import ModelAdapter, adapter_for, describe
from tome_deploy.models.blocks import ToMeBlocks


def apply_tome(
    model: nn.Module,
    r: RSpec,
    formulation: MergeFormulation | str = "scatter",
    strict: bool = False,
    adapter: Optional[ModelAdapter] = None,
) -> tuple[nn.Module, Schedule]:
    """Return (a ToMe copy of `model`, its resolved schedule). `model` itself is left unchanged.

    formulation: a registered MergeFormulation (artifact/formulations.py) or its name.
    adapter: `model`'s, when the caller has it (`LoadedModel.adapter`); None finds it here.

    Clamping is data: `schedule.clamped_layers` and `schedule.clamp_note()`; strict=True raises instead.
    The copy's `tome_blocks(tome)` records the adapter, the model's shape and the schedule.
    """
    formulation = get_formulation(formulation)
    adapter = adapter or adapter_for(model)
    shape = describe(adapter, model)
    schedule = resolve_schedule(r, shape.tokens, shape.depth, shape.num_prefix, strict)
    tome = copy.deepcopy(model)
    blocks = [
        adapter.tome_block(block, r_eff, schedule.num_prefix, formulation)
        for block, r_eff in zip(adapter.blocks(tome), schedule.effective)
    ]
    adapter.install(tome, ToMeBlocks(blocks, adapter, shape, schedule))
    return tome, schedule


def track_sources(tome_model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which input tokens each final token stands for: (source [B, N, N0], size [B, N, 1])."""
    blocks = tome_blocks(tome_model)
    x, context = blocks.adapter.embed(tome_model, pixels)
    _, size, source = blocks.forward_with_sources(x, context)
    return source, size


def tome_blocks(tome_model: nn.Module) -> ToMeBlocks:
    """The ToMeBlocks apply_tome installed: the ToMe layers, and the record of the model's family adapter,
    shape and schedule (`.adapter`, `.shape`, `.schedule`)."""
    found = next((m for m in tome_model.modules() if isinstance(m, ToMeBlocks)), None)
    if found is None:
        raise InvalidInputError(f"{type(tome_model).__name__} has no ToMe blocks: pass the model apply_tome returned")
    return found
