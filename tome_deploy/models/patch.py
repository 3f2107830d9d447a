"""apply_tome: a ToMe copy of any model a family adapter (models/adapter.py) accepts, and source tracking."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from tome_deploy.artifact.formulations import MergeFormulation, get_formulation
from tome_deploy.core.schedule import RSpec, Schedule, resolve_schedule
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
    """
    formulation = get_formulation(formulation)
    adapter = adapter or adapter_for(model)
    shape = describe(adapter, model)
    schedule = resolve_schedule(r, shape.tokens, shape.depth, shape.num_prefix, strict)
    tome = copy.deepcopy(model)
    blocks = [adapter.tome_block(block, r_eff, schedule.num_prefix, formulation)
              for block, r_eff in zip(adapter.blocks(tome), schedule.effective)]
    adapter.install(tome, ToMeBlocks(blocks, schedule.tokens[0]))
    tome.tome_schedule = schedule
    tome.tome_adapter = adapter
    return tome, schedule


def track_sources(tome_model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which input tokens each final token stands for: (source [B, N, N0], size [B, N, 1])."""
    adapter = tome_model.tome_adapter
    x, context = adapter.embed(tome_model, pixels)
    _, size, source = tome_blocks(tome_model).forward_with_sources(x, context)
    return source, size


def tome_blocks(tome_model: nn.Module) -> ToMeBlocks:
    """The ToMeBlocks apply_tome installed."""
    return next(m for m in tome_model.modules() if isinstance(m, ToMeBlocks))
