"""Pick a merge schedule from a speedup target: the smallest constant r whose FLOPs ratio reaches it.

The ratio is the theoretical one of `flops.theoretical_speedup` (FACTS §7 counting rule) over the token
counts `resolve_schedule` gives, clamping included. Tokens per layer never grow with r, so the ratio never
drops as r grows: the first r that reaches the target is the smallest, and the largest useful r,
(tokens - prefix) // 2, merges as much as any schedule can (half the patch tokens of every layer)."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from tome_deploy.artifact.spec import MERGE_FORMULATIONS, MergeFormulation
from tome_deploy.core.merge import bipartite_match, merge_sum, merge_weighted
from tome_deploy.core.schedule import RSpec, Schedule, resolve_schedule
from tome_deploy.core.speedup import SpeedupChoice, schedule_for_speedup
from tome_deploy.errors import InvalidInputError, UnsupportedModelError
from tome_deploy.models.timm_vit import check_supported, tokens_at_input, tome_attention


def speedup_choice_for_model(model, target: float, *, strict: bool = False) -> SpeedupChoice:
    """schedule_for_speedup for a supported timm ViT's shapes, with its real MLP width (as the export's
    metadata counts it), so the predicted ratio is the one the export reports."""
    from tome_deploy.models.timm_vit import check_supported, mlp_ratio, tokens_at_input

    check_supported(model)
    r, predicted = schedule_for_speedup(
        tokens_at_input(model), len(model.blocks), int(model.num_prefix_tokens), int(model.embed_dim), target,
        mlp_ratio(model), strict=strict,
    )
    return SpeedupChoice(float(target), r, predicted)


class TokenMerger(nn.Module):
    """Matching + merging of one block. A module of its own so that its ONNX nodes carry its name scope."""

    def __init__(self, r: int, num_prefix: int, formulation: MergeFormulation):
        super().__init__()
        self.r, self.num_prefix, self.formulation = r, num_prefix, formulation

    def forward(
        self, x: torch.Tensor, size: Optional[torch.Tensor], metric: torch.Tensor, source: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """x: [B, N, C], size: [B, N, 1] or None, metric: [B, N, c], source: [B, N, N0] or None -> N - r tokens."""
        match = bipartite_match(metric, self.r, self.num_prefix)
        if size is None:
            size = torch.ones_like(x[..., :1], dtype=torch.float32)  # [B, N, 1]
        if source is not None:
            source = merge_sum(source, match, self.formulation)
        x, size = merge_weighted(x, size, match, self.formulation)
        return x, size, source

    def extra_repr(self) -> str:
        return f"r={self.r}, num_prefix={self.num_prefix}, formulation={self.formulation}"


class ToMeBlock(nn.Module):
    """A timm pre-norm Block with ToMe between attention and MLP; reuses the block's own layers."""

    def __init__(self, block: nn.Module, r: int, num_prefix: int, formulation: MergeFormulation):
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2
        self.merger = TokenMerger(r, num_prefix, formulation) if r > 0 else None

    def forward(
        self, x: torch.Tensor, size: Optional[torch.Tensor], source: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """x: [B, N, C], size: [B, N, 1] or None, source: [B, N, N0] or None -> the same, N - r tokens."""
        attn_out, metric = tome_attention(self.attn, self.norm1(x), size)
        x = x + self.drop_path1(self.ls1(attn_out))
        if self.merger is not None:
            x, size, source = self.merger(x, size, metric, source)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size, source


class ToMeBlocks(nn.Module):
    """Replaces `model.blocks`: threads the token sizes from block to block, no state kept."""

    def __init__(self, blocks: list[ToMeBlock], num_tokens: int):
        super().__init__()
        self.layers = nn.ModuleList(blocks)
        self.num_tokens = num_tokens  # the per-layer r were clamped for exactly this many tokens

    def check_tokens(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.num_tokens:
            raise InvalidInputError(
                f"the ToMe schedule was fixed for {self.num_tokens} tokens but the input has {x.shape[1]}: "
                "feed images of the size the model was patched at, or apply ToMe to a model created "
                "with the img_size you need"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_tokens(x)
        size = None
        for block in self.layers:
            x, size, _ = block(x, size)
        return x

    def forward_with_sources(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, N0, C] -> (tokens [B, N, C], size [B, N, 1], source [B, N, N0]).

        source[b, i, j] = 1 when final token i contains input token j (source tracking).
        """
        self.check_tokens(x)
        batch, num_tokens, _ = x.shape
        source = torch.eye(num_tokens, dtype=torch.float32, device=x.device).expand(batch, -1, -1)
        size = None
        for block in self.layers:
            x, size, source = block(x, size, source)
        if size is None:
            size = torch.ones_like(x[..., :1], dtype=torch.float32)
        return x, size, source


def apply_tome(
    model: nn.Module,
    r: RSpec,
    formulation: MergeFormulation = "scatter",
    strict: bool = False,
) -> tuple[nn.Module, Schedule]:
    """Return (a ToMe copy of `model`, its resolved schedule). `model` itself is left unchanged."""
    if formulation not in MERGE_FORMULATIONS:
        raise UnsupportedModelError(f"unknown merge formulation {formulation!r}; choose one of {MERGE_FORMULATIONS}")
    check_supported(model)
    schedule = resolve_schedule(r, tokens_at_input(model), len(model.blocks), int(model.num_prefix_tokens), strict)
    tome = copy.deepcopy(model)
    tome.grad_checkpointing = False  # checkpoint_seq would call the blocks without sizes
    tome.blocks = ToMeBlocks(
        [ToMeBlock(block, r_eff, schedule.num_prefix, formulation) for block, r_eff in zip(tome.blocks, schedule.effective)],
        schedule.tokens[0],
    )
    tome.tome_schedule = schedule
    return tome, schedule


def track_sources(tome_model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which input tokens each final token stands for: (source [B, N, N0], size [B, N, 1])."""
    x = tome_model.patch_embed(pixels)
    x = tome_model._pos_embed(x)
    x = tome_model.patch_drop(x)
    x = tome_model.norm_pre(x)
    _, size, source = tome_model.blocks.forward_with_sources(x)
    return source, size
