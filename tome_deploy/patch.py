"""Model surgery: a timm VisionTransformer rewritten into a stateless, fixed-shape ToMe model.

`apply_tome` returns a new module (a deep copy); the model passed in is never touched. Each block's r
is fixed here, so the forward pass carries no schedule state and traces to a static graph.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError, UnsupportedModelError
from .merge import MergeFormulation, bipartite_match, merge_sum, merge_weighted
from .merge import proportional_attention_bias
from .schedule import RSpec, Schedule, resolve_schedule
from .spec import MERGE_FORMULATIONS


def _timm_vit_classes():
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    return VisionTransformer, Block, Attention


def check_supported(model: nn.Module) -> None:
    """Raise UnsupportedModelError unless every block is a pre-norm timm Block with plain Attention."""
    vit_cls, block_cls, attention_cls = _timm_vit_classes()
    if not isinstance(model, vit_cls):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a timm VisionTransformer; ToMe export supports ViT, DeiT (incl. "
            "distilled), DeiT-3, qk-norm, register-token, mean-pool and MAP-pool ViTs built on "
            "timm.models.vision_transformer.VisionTransformer"
        )
    for i, block in enumerate(model.blocks):
        if type(block) is not block_cls or type(block.attn) is not attention_cls:
            raise UnsupportedModelError(
                f"block {i} is {type(block).__name__} with {type(getattr(block, 'attn', None)).__name__}; "
                "ToMe supports only timm's pre-norm Block with the standard Attention (not parallel, "
                "post-norm, RoPE or relative-position blocks)"
            )


def tokens_at_input(model: nn.Module) -> int:
    """Patch tokens plus prefix tokens the first block sees."""
    grid = model.patch_embed.grid_size
    return int(grid[0] * grid[1]) + int(model.num_prefix_tokens)


def mlp_ratio(model: nn.Module) -> float:
    """The MLP's width as the FLOP rule's ratio: 16 N C^2 FLOPs for a 4x MLP (two C x 4C matmuls)."""
    mlp = next(m.mlp for m in model.blocks.modules() if isinstance(getattr(m, "mlp", None), nn.Module))  # timm or ToMe blocks
    weights = sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear))
    return weights / (2 * int(model.embed_dim) ** 2)


def tome_attention(
    attn: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Attention.forward with proportional attention; also returns the merge metric.

    x: [B, N, C], size: [B, N, 1] or None (all ones) -> (out [B, N, C], keys averaged over heads [B, N, hd]).
    """
    batch, tokens, _ = x.shape
    gate_layer = getattr(attn, "gate", None)  # timm >= 1.0.2x only
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, H, N, hd] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    # Before the first merge every size is 1 and log(1) = 0: skipping the bias keeps r=0 bit-exact.
    bias = None if size is None else proportional_attention_bias(size).to(q.dtype)  # [B, 1, 1, N]
    dropout = attn.attn_drop.p if attn.training else 0.0
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # [B, H, N, N]
        if bias is not None:
            logits = logits + bias
        out = attn.attn_drop(logits.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k.mean(dim=1)


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
