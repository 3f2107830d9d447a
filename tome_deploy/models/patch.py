"""apply_tome: a ToMe copy of any model a family adapter (models/adapter.py) accepts, and what follows
from it: the schedule for a speedup target, source tracking."""

from __future__ import annotations

import copy

import torch
from torch import nn

from tome_deploy.artifact.formulations import MergeFormulation, get_formulation
from tome_deploy.core.schedule import RSpec, Schedule, resolve_schedule
from tome_deploy.core.speedup import SpeedupChoice, schedule_for_speedup
from tome_deploy.models.adapter import adapter_for
from tome_deploy.models.blocks import ToMeBlocks


def speedup_choice_for_model(model, target: float, *, strict: bool = False, stride: int = 1) -> SpeedupChoice:
    """schedule_for_speedup for a supported model's shapes, with its real MLP width (as the export's
    metadata counts it), so the predicted ratio is the one the export reports."""
    adapter = adapter_for(model)
    r, predicted = schedule_for_speedup(
        adapter.tokens_at_input(model), len(adapter.blocks(model)), adapter.num_prefix_tokens(model),
        adapter.embed_dim(model), target, adapter.mlp_ratio(model), strict=strict, stride=stride,
    )
    return SpeedupChoice(float(target), r, predicted)


def apply_tome(
    model: nn.Module,
    r: RSpec,
    formulation: MergeFormulation | str = "scatter",
    strict: bool = False,
) -> tuple[nn.Module, Schedule]:
    """Return (a ToMe copy of `model`, its resolved schedule). `model` itself is left unchanged.

    formulation: a registered MergeFormulation (artifact/formulations.py) or its name.
    Clamping is data: `schedule.clamped_layers` and `schedule.clamp_note()`; strict=True raises instead.
    """
    formulation = get_formulation(formulation)
    adapter = adapter_for(model)
    schedule = resolve_schedule(
        r, adapter.tokens_at_input(model), len(adapter.blocks(model)), adapter.num_prefix_tokens(model), strict
    )
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
