"""The family-independent ToMe modules: one block's merge step, the pre-norm ToMe block most families
share, and the chain of ToMe blocks that threads token sizes (and, for source tracking, which input tokens
each token holds) from block to block."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from tome_deploy.artifact.formulations import MergeFormulation
from tome_deploy.core.merge import Match, bipartite_match, merge_sum, merge_weighted
from tome_deploy.core.schedule import ModelShape, Schedule
from tome_deploy.errors import InvalidInputError
from tome_deploy.models.adapter import ModelAdapter


class TokenMerger(nn.Module):
    """Matching + merging of one block. A module of its own so that its ONNX nodes carry its name scope."""

    def __init__(self, r: int, num_prefix: int, formulation: MergeFormulation):
        super().__init__()
        self.r, self.num_prefix, self.formulation = r, num_prefix, formulation

    def match(self, keys: torch.Tensor) -> Match:
        """keys: [B, H, N, hd] -> the r pairs to merge and the N - r kept positions, matched on the metric
        the paper uses: the keys averaged over heads ([B, N, hd])."""
        return bipartite_match(keys.mean(dim=1), self.r, self.num_prefix)

    def merge(
        self, x: torch.Tensor, size: Optional[torch.Tensor], match: Match, source: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """x: [B, N, C], size: [B, N, 1] or None, source: [B, N, N0] or None -> N - r tokens."""
        if size is None:
            size = torch.ones_like(x[..., :1], dtype=torch.float32)  # [B, N, 1]
        if source is not None:
            source = merge_sum(source, match, self.formulation)
        x, size = merge_weighted(x, size, match, self.formulation)
        return x, size, source

    def forward(
        self, x: torch.Tensor, size: Optional[torch.Tensor], keys: torch.Tensor, source: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Match]:
        """x: [B, N, C], size: [B, N, 1] or None, keys: [B, H, N, hd], source: [B, N, N0] or None -> N - r tokens,
        and the Match (for blocks that carry per-position data along, such as Eva's rotary tables). One call, so
        that every matching and merging node, the keys' mean over heads included, carries this module's name
        scope (the profiler's merge share)."""
        match = self.match(keys)
        return (*self.merge(x, size, match, source), match)

    def extra_repr(self) -> str:
        return f"r={self.r}, num_prefix={self.num_prefix}, formulation={self.formulation.name}"


# attention(attn module, x [B, N, C], size [B, N, 1] or None) -> (out [B, N, C], keys [B, H, N, hd])
ToMeAttention = Callable[[nn.Module, torch.Tensor, Optional[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


class PreNormToMeBlock(nn.Module):
    """A pre-norm transformer block with ToMe between attention and MLP, on the block's own layers:

        x = x + after_attn(attention(attn, norm1(x), size));  merge r tokens;  x = x + after_mlp(mlp(norm2(x)))

    `attention` is the family's attention with proportional attention; `after_attn` / `after_mlp` are the
    layers (LayerScale, drop path, dropout) between each branch and its residual add, in call order."""

    def __init__(
        self,
        attention: ToMeAttention,
        norm1: nn.Module,
        attn: nn.Module,
        after_attn: Sequence[nn.Module],
        norm2: nn.Module,
        mlp: nn.Module,
        after_mlp: Sequence[nn.Module],
        r: int,
        num_prefix: int,
        formulation: MergeFormulation,
    ):
        super().__init__()
        self.attention = attention  # a function, not a module: it owns no weights
        self.norm1, self.attn, self.after_attn = norm1, attn, nn.Sequential(*after_attn)
        self.norm2, self.mlp, self.after_mlp = norm2, mlp, nn.Sequential(*after_mlp)
        self.merger = TokenMerger(r, num_prefix, formulation) if r > 0 else None

    def forward(
        self, x: torch.Tensor, size: Optional[torch.Tensor], source: Optional[torch.Tensor] = None, context: Any = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Any]:
        """x: [B, N, C], size: [B, N, 1] or None, source: [B, N, N0] or None -> the same, N - r tokens."""
        attn_out, keys = self.attention(self.attn, self.norm1(x), size)
        x = x + self.after_attn(attn_out)
        if self.merger is not None:
            x, size, source, _ = self.merger(x, size, keys, source)
        return x + self.after_mlp(self.mlp(self.norm2(x))), size, source, context


class ToMeBlocks(nn.Module):
    """Replaces a model's blocks: threads the token sizes from block to block, no state kept.

    context: what a family's blocks need besides the tokens (e.g. rotary tables), passed along and
    updated by each block; None for families whose blocks need nothing.

    Also the ToMe model's record of what apply_tome built it from (models/patch.py `tome_blocks` finds it):
    `adapter`, the family's ModelAdapter; `shape`, the original model's ModelShape; `schedule`, the resolved
    Schedule. Plain attributes, not submodules, parameters or buffers: no state_dict or exported graph holds them.
    """

    adapter: ModelAdapter
    shape: ModelShape
    schedule: Schedule

    def __init__(self, blocks: list[nn.Module], adapter: ModelAdapter, shape: ModelShape, schedule: Schedule):
        super().__init__()
        if isinstance(adapter, nn.Module):
            raise TypeError(f"a ModelAdapter is a plain object, not a module: got {type(adapter).__name__}")
        self.layers = nn.ModuleList(blocks)
        self.adapter, self.shape, self.schedule = adapter, shape, schedule
        self.num_tokens = schedule.tokens[0]  # the per-layer r were clamped for exactly this many tokens

    def check_tokens(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.num_tokens:
            raise InvalidInputError(
                f"the ToMe schedule was fixed for {self.num_tokens} tokens but the input has {x.shape[1]}: "
                "feed images of the size the model was patched at, or apply ToMe to a model created "
                "with the img_size you need"
            )

    def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:
        self.check_tokens(x)
        size = None
        for block in self.layers:
            x, size, _, context = block(x, size, None, context)
        return x

    def forward_with_sources(
        self, x: torch.Tensor, context: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, N0, C] -> (tokens [B, N, C], size [B, N, 1], source [B, N, N0]).

        source[b, i, j] = 1 when final token i contains input token j (source tracking).
        """
        self.check_tokens(x)
        batch, num_tokens, _ = x.shape
        source = torch.eye(num_tokens, dtype=torch.float32, device=x.device).expand(batch, -1, -1)
        size = None
        for block in self.layers:
            x, size, source, context = block(x, size, source, context)
        if size is None:
            size = torch.ones_like(x[..., :1], dtype=torch.float32)
        return x, size, source
