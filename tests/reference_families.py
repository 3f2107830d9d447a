"""Plain eager ToMe references for the timm Eva, Hugging Face and OpenCLIP families.

Written from FACTS.md section 1 and the families' published forward passes, NOT from tome_deploy: each
block is spelled out from the model's own weights in float64 (attention by hand: q k^T * scale + log(size),
softmax, times v), matching and merging one image at a time with reference_tome.reference_match /
reference_merge. The RoPE rule (ours, see the README): every token carries the rotary angles of the patch it
started at; a merged token keeps its destination's angles.
"""

from __future__ import annotations

import copy

import torch
from reference_tome import reference_match, reference_merge


def _attention(q, k, v, size, scale):
    """q, k, v: [B, H, N, hd], size: [B, N] -> [B, N, H * hd]."""
    logits = (q @ k.transpose(-1, -2)) * scale + size.log()[:, None, None, :]
    out = logits.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _heads(t, heads):
    """[B, N, H * hd] -> [B, H, N, hd]."""
    batch, tokens, width = t.shape
    return t.reshape(batch, tokens, heads, width // heads).transpose(1, 2)


def _merge_all(x, size, metric, r, p, extra=None):
    """Merge r tokens of every image; extra: [B, N] per-token ids carried along (kept = destination's)."""
    if r == 0:
        return x, size, extra
    new_x, new_size, new_extra = [], [], []
    for b in range(x.shape[0]):
        src_a, dst_b, order = reference_match(metric[b], r, p)
        tokens_b, size_b = reference_merge(x[b], size[b], src_a, dst_b, order)
        new_x.append(tokens_b.to(x.dtype))
        new_size.append(size_b.to(x.dtype))
        if extra is not None:
            new_extra.append(extra[b][order])
    return torch.stack(new_x), torch.stack(new_size), (torch.stack(new_extra) if extra is not None else None)


def _rotate_cat(x, table):
    """timm's 'cat' rotary layout: table = [sin | cos] per token; pairs (0, 1), (2, 3), ... rotate together.
    x: [B, H, M, hd], table: [B, M, 2 hd]."""
    sin, cos = table[:, None].chunk(2, dim=-1)
    rotated = torch.stack([-x[..., 1::2], x[..., 0::2]], dim=-1).reshape(x.shape)
    return x * cos + rotated * sin


@torch.no_grad()
def reference_eva(model, pixels, r_per_layer, dtype=torch.float64):
    """ToMe forward of a timm Eva (pre-norm EvaBlock / EvaAttention, 'cat' RoPE, fused qkv)."""
    model = copy.deepcopy(model).to(dtype).eval()
    x, table = model._pos_embed(model.patch_embed(pixels.to(dtype)))
    x = model.norm_pre(x)
    p = model.num_prefix_tokens
    batch, n0, _ = x.shape
    size = torch.ones(batch, n0, dtype=dtype)
    position = torch.arange(n0 - p).expand(batch, -1)  # which patch's angles each non-prefix token carries
    for block, r in zip(model.blocks, r_per_layer):
        attn, h = block.attn, block.norm1(x)
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, v = (_heads(t, attn.num_heads) for t in torch.nn.functional.linear(h, attn.qkv.weight, bias).chunk(3, -1))
        rope = table[position]  # [B, N - p, 2 hd]
        q = torch.cat([q[:, :, :p], _rotate_cat(q[:, :, p:], rope)], dim=2)
        k = torch.cat([k[:, :, :p], _rotate_cat(k[:, :, p:], rope)], dim=2)
        out = attn.proj(attn.norm(_attention(q, k, v, size, attn.head_dim ** -0.5)))
        x = x + (out if block.gamma_1 is None else block.gamma_1 * out)
        r = max(0, min(r, (x.shape[1] - p) // 2))
        ids = torch.cat([torch.full((batch, p), -1), position], dim=1)
        x, size, ids = _merge_all(x, size, k.mean(dim=1), r, p, ids)
        position = ids[:, p:]
        mlp = block.mlp(block.norm2(x))
        x = x + (mlp if block.gamma_2 is None else block.gamma_2 * mlp)
    return model.forward_head(model.norm(x)).float()


@torch.no_grad()
def reference_hf_vit(model, pixels, r_per_layer, dtype=torch.float64):
    """ToMe forward of transformers' ViTForImageClassification (class token at 0)."""
    model = copy.deepcopy(model).to(dtype).eval()
    x = model.vit.embeddings(pixels.to(dtype))
    batch, n0, _ = x.shape
    size = torch.ones(batch, n0, dtype=dtype)
    for layer, r in zip(model.vit.layers, r_per_layer):
        attn, h = layer.attention, layer.layernorm_before(x)
        heads = model.config.num_attention_heads
        q, k, v = (_heads(proj(h), heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        x = x + attn.o_proj(_attention(q, k, v, size, q.shape[-1] ** -0.5))
        x, size, _ = _merge_all(x, size, k.mean(dim=1), max(0, min(r, (x.shape[1] - 1) // 2)), 1)
        x = x + layer.mlp(layer.layernorm_after(x))
    return model.classifier(model.vit.layernorm(x)[:, 0]).float()


@torch.no_grad()
def reference_open_clip(visual, pixels, r_per_layer, dtype=torch.float64):
    """ToMe forward of an OpenCLIP VisionTransformer (class-token pooling): the image embedding."""
    visual = copy.deepcopy(visual).to(dtype).eval()
    x = visual._embeds(pixels.to(dtype))
    batch, n0, width = x.shape
    size = torch.ones(batch, n0, dtype=dtype)
    for block, r in zip(visual.transformer.resblocks, r_per_layer):
        attn, h = block.attn, block.ln_1(x)
        q, k, v = (_heads(t, attn.num_heads) for t in torch.nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
        x = x + block.ls_1(attn.out_proj(_attention(q, k, v, size, (width // attn.num_heads) ** -0.5)))
        x, size, _ = _merge_all(x, size, k.mean(dim=1), max(0, min(r, (x.shape[1] - 1) // 2)), 1)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return (visual.ln_post(x[:, 0]) @ visual.proj).float()
