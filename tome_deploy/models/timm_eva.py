"""The timm Eva family (EVA, EVA-02, RoPE ViTs built on timm.models.eva.Eva): rotary position embeddings,
SwiGLU MLPs, separate q/k/v biases.

RoPE rule (ours; the ToMe paper has none): rotary angles belong to a token's position. A token keeps its
own angles; after a merge the destination keeps the destination's angles (the merged-away source's are
dropped), so after each merging block the rotary table is gathered with the kept positions. Prefix tokens
(class, registers) get no rotation, as in timm. The table starts as [N - p, 2 hd] (no batch) and becomes
[B, N' - p, 2 hd] after the first merge, because each image keeps other positions; all shapes stay static.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tome_deploy.artifact.formulations import MergeFormulation
from tome_deploy.artifact.input_spec import InputSpec
from tome_deploy.core.attention import scaled_attention
from tome_deploy.core.merge import kept_tokens, proportional_attention_bias
from tome_deploy.errors import UnsupportedModelError
from tome_deploy.models.adapter import mlp_width_ratio
from tome_deploy.models.blocks import TokenMerger


def _eva_classes():
    from timm.models.eva import Eva, EvaAttention, EvaBlock

    return Eva, EvaBlock, EvaAttention


def _rotate(x: torch.Tensor, rope: torch.Tensor, half: bool) -> torch.Tensor:
    """x: [B, H, M, hd], rope: [M, 2 hd] or [B, M, 2 hd] (sin | cos) -> x rotated (timm's cat layout)."""
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat

    return apply_rot_embed_cat(x, rope if rope.ndim == 2 else rope[:, None], half=half)


def eva_tome_attention(
    attn: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor], rope: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm EvaAttention.forward with proportional attention; also returns the keys, which matching averages over heads.

    x: [B, N, C], size: [B, N, 1] or None, rope: rotary table of the non-prefix tokens or None
    -> (out [B, N, C], keys averaged over heads [B, N, hd], after RoPE as attention uses them).
    """
    batch, tokens, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    if attn.qkv is not None:
        bias = None if attn.q_bias is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        if bias is not None and attn.qkv_bias_separate:
            qkv = attn.qkv(x) + bias
        else:
            qkv = F.linear(x, attn.qkv.weight, bias)
        q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = (
            proj(x).reshape(batch, tokens, attn.num_heads, -1).transpose(1, 2)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
        )  # [B, H, N, hd] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p, half = attn.num_prefix_tokens, attn.rotate_half
        q = torch.cat([q[:, :, :p], _rotate(q[:, :, p:], rope, half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :p], _rotate(k[:, :, p:], rope, half)], dim=2).type_as(v)
    key_bias = None if size is None else proportional_attention_bias(size).to(q.dtype)  # [B, 1, 1, N]
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = scaled_attention(q, k, v, key_bias, dropout=dropout)  # [B, H, N, hd]
    out = attn.norm(out.transpose(1, 2).reshape(batch, tokens, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), k


class EvaToMeBlock(nn.Module):
    """A timm EvaBlock (pre-norm) with ToMe between attention and MLP; the context is the rotary table."""

    def __init__(self, block: nn.Module, r: int, num_prefix: int, formulation: MergeFormulation):
        super().__init__()
        self.norm1, self.attn, self.gamma_1, self.drop_path1 = block.norm1, block.attn, block.gamma_1, block.drop_path1
        self.norm2, self.mlp, self.gamma_2, self.drop_path2 = block.norm2, block.mlp, block.gamma_2, block.drop_path2
        self.num_prefix = num_prefix
        self.merger = TokenMerger(r, num_prefix, formulation) if r > 0 else None

    def forward(
        self,
        x: torch.Tensor,
        size: Optional[torch.Tensor],
        source: Optional[torch.Tensor],
        rope: Optional[torch.Tensor],
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        attn_out, keys = eva_tome_attention(self.attn, self.norm1(x), size, rope)
        if self.gamma_1 is not None:
            attn_out = self.gamma_1 * attn_out
        x = x + self.drop_path1(attn_out)
        if self.merger is not None:
            x, size, source, match = self.merger(x, size, keys, source)
            if rope is not None:  # the RoPE rule: kept tokens keep their angles
                table = rope.expand(x.shape[0], -1, -1) if rope.ndim == 2 else rope  # [B, N - p, 2 hd]
                rope = kept_tokens(table, match)
        mlp_out = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            mlp_out = self.gamma_2 * mlp_out
        return x + self.drop_path2(mlp_out), size, source, rope


class _RopeBlocksCall(nn.Module):
    """What Eva.forward_features loops over (`blk(x, rope=..., attn_mask=..., is_causal=...)`): one module
    that runs the ToMe blocks with the rotary table as their context."""

    def __init__(self, blocks: nn.Module):
        super().__init__()
        self.tome_blocks = blocks

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None, attn_mask=None, is_causal: bool = False):
        return self.tome_blocks(x, rope)


class TimmEvaAdapter:
    """timm.models.eva.Eva with pre-norm EvaBlocks and EvaAttention (absolute and/or 'cat' rotary embeddings)."""

    family = "timm Eva (EVA-02, RoPE ViTs with EvaAttention)"

    def accepts(self, model: nn.Module) -> bool:
        return isinstance(model, _eva_classes()[0])

    def check_supported(self, model: nn.Module) -> None:
        _, block_cls, attention_cls = _eva_classes()
        name = type(model).__name__
        if getattr(model, "rope_mixed", False):
            raise UnsupportedModelError(
                f"{name} uses mixed (per-depth, learned) RoPE; ToMe supports Eva models with one rotary table"
            )
        if getattr(model, "dynamic_img_size", False):
            raise UnsupportedModelError(
                f"{name} was built with dynamic_img_size; ToMe needs a fixed image size (create it without dynamic_img_size)"
            )
        rope = getattr(model, "rope", None)
        if rope is not None and not hasattr(rope, "feat_shape"):
            raise UnsupportedModelError(
                f"{name} uses {type(rope).__name__}, whose table needs a grid at run time; ToMe supports RotaryEmbeddingCat-style tables"
            )
        for i, block in enumerate(model.blocks):
            if type(block) is not block_cls or type(block.attn) is not attention_cls:
                raise UnsupportedModelError(
                    f"block {i} of {name} is {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}; "
                    "ToMe supports Eva's pre-norm EvaBlock with EvaAttention (not post-norm or AttentionRope blocks)"
                )

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def tome_block(self, block: nn.Module, r: int, num_prefix: int, formulation: MergeFormulation) -> nn.Module:
        return EvaToMeBlock(block, r, num_prefix, formulation)

    def install(self, model: nn.Module, blocks: nn.Module) -> None:
        model.grad_checkpointing = False
        model.blocks = nn.ModuleList([_RopeBlocksCall(blocks)])

    def embed(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x, rope = model._pos_embed(model.patch_embed(pixels))
        return model.norm_pre(x), rope

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def tokens_at_input(self, model: nn.Module) -> int:
        grid = model.patch_embed.grid_size
        return int(grid[0] * grid[1]) + int(model.num_prefix_tokens)

    def grid_size(self, model: nn.Module) -> tuple[int, int]:
        return tuple(int(v) for v in model.patch_embed.grid_size)

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.embed_dim)

    def mlp_ratio(self, model: nn.Module) -> float:
        mlp = next(m.mlp for m in model.modules() if isinstance(getattr(m, "mlp", None), nn.Module))
        return mlp_width_ratio(mlp, int(model.embed_dim))

    def input_spec(self, model: nn.Module) -> InputSpec:
        from tome_deploy.models.timm_vit import input_spec

        return input_spec(model)

    def output_kind(self, model: nn.Module) -> str:
        return "logits" if getattr(model, "num_classes", 0) else "embedding"


ADAPTER = TimmEvaAdapter()
