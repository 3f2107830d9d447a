"""The timm VisionTransformer family, the first adapter behind models/adapter.py: support check, token
counts, MLP width, attention with proportional attention and the keys to match on, the ToMe block, where the
blocks go, preprocessing config."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from tome_deploy.artifact.formulations import MergeFormulation
from tome_deploy.artifact.input_spec import InputSpec, image_spec
from tome_deploy.artifact.spec import EXPORT_SPEC
from tome_deploy.core.attention import scaled_attention
from tome_deploy.core.merge import proportional_attention_bias
from tome_deploy.errors import UnsupportedModelError
from tome_deploy.models.adapter import mlp_width_ratio
from tome_deploy.models.blocks import PreNormToMeBlock


def input_spec(model: torch.nn.Module) -> InputSpec:
    """The image input [C, H, W] and its normalisation, read from the model (timm's pretrained_cfg) as data."""
    from timm.data import resolve_data_config

    config = resolve_data_config(model=model)
    height, width = model.patch_embed.img_size
    return image_spec(
        EXPORT_SPEC.input_name,
        [int(model.patch_embed.proj.in_channels), int(height), int(width)],
        mean=[float(v) for v in config["mean"]],
        std=[float(v) for v in config["std"]],
        interpolation=str(config.get("interpolation", "bicubic")),
        crop_pct=float(config.get("crop_pct", 0.875)),
    )


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
    mlp = next(
        m.mlp for m in model.blocks.modules() if isinstance(getattr(m, "mlp", None), nn.Module)
    )  # timm or ToMe blocks
    return mlp_width_ratio(mlp, int(model.embed_dim))


def tome_attention(attn: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """timm Attention.forward with proportional attention; also returns the keys, which matching averages over heads.

    x: [B, N, C], size: [B, N, 1] or None (all ones) -> (out [B, N, C], keys [B, H, N, hd]).
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
    out = scaled_attention(q, k, v, bias, attn.scale, dropout, fused=attn.fused_attn)  # [B, H, N, hd]
    out = out.transpose(1, 2).reshape(batch, tokens, attn.num_heads * attn.head_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k


class TimmViTAdapter:
    """timm.models.vision_transformer.VisionTransformer: the ToMe blocks replace `model.blocks`."""

    family = "timm VisionTransformer (ViT, DeiT, DeiT-3, registers, qk-norm, mean/MAP pooling)"

    def accepts(self, model: nn.Module) -> bool:
        return isinstance(model, _timm_vit_classes()[0])

    def check_supported(self, model: nn.Module) -> None:
        check_supported(model)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.blocks)

    def tome_block(self, block: nn.Module, r: int, num_prefix: int, formulation: MergeFormulation) -> nn.Module:
        return PreNormToMeBlock(
            tome_attention,
            block.norm1,
            block.attn,
            [block.ls1, block.drop_path1],
            block.norm2,
            block.mlp,
            [block.ls2, block.drop_path2],
            r,
            num_prefix,
            formulation,
        )

    def install(self, model: nn.Module, blocks: nn.Module) -> None:
        model.grad_checkpointing = False  # checkpoint_seq would call the blocks without sizes
        model.blocks = blocks

    def embed(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x = model.patch_embed(pixels)
        x = model._pos_embed(x)
        x = model.patch_drop(x)
        return model.norm_pre(x), None

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(model.num_prefix_tokens)

    def tokens_at_input(self, model: nn.Module) -> int:
        return tokens_at_input(model)

    def grid_size(self, model: nn.Module) -> tuple[int, int]:
        return tuple(int(v) for v in model.patch_embed.grid_size)

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.embed_dim)

    def mlp_ratio(self, model: nn.Module) -> float:
        return mlp_ratio(model)

    def input_spec(self, model: nn.Module) -> InputSpec:
        return input_spec(model)

    def output_kind(self, model: nn.Module) -> str:
        return "logits" if getattr(model, "num_classes", 0) else "embedding"


ADAPTER = TimmViTAdapter()
