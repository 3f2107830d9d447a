"""Theoretical cost of a ViT forward with and without merging (docs/design.md#the-flop-rule)."""

from __future__ import annotations

from typing import Sequence


def block_flops(tokens_in: int, tokens_out: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """Attention at the block's input tokens, MLP at its output tokens (ToMe merges in between)."""
    attention = 8 * tokens_in * dim**2 + 4 * tokens_in**2 * dim
    mlp = 4 * mlp_ratio * tokens_out * dim**2
    return float(attention + mlp)


def transformer_flops(tokens: Sequence[int], dim: int, mlp_ratio: float = 4.0) -> float:
    """tokens: count entering each block plus the final count (Schedule.tokens)."""
    return sum(block_flops(tokens[i], tokens[i + 1], dim, mlp_ratio) for i in range(len(tokens) - 1))


def theoretical_speedup(tokens: Sequence[int], dim: int, mlp_ratio: float = 4.0) -> float:
    """FLOP ratio of the unmerged blocks over the merged ones."""
    unmerged = [tokens[0]] * len(tokens)
    return transformer_flops(unmerged, dim, mlp_ratio) / transformer_flops(tokens, dim, mlp_ratio)
