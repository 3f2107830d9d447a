"""Plain float64 ToMe references for transformers' video classifiers, VideoMAE and ViViT.

Written from docs/design.md, docs/model-families.md and the models' published forward passes, NOT from
tome_deploy: the tubelet embedding is spelled out on the Conv3d's weights (one matrix product per tubelet), the
sin-cos position table from its formula, every layer's attention by hand (q k^T * scale + log(size), softmax,
times v), matching and merging one clip at a time with reference_tome.reference_match / reference_merge. Heads
see the merged tokens without their sizes: VideoMAE's mean pooling is the plain mean of the merged tokens.
"""

from __future__ import annotations

import copy

import torch
from reference_families import _attention, _heads, _merge_all


def tubelet_tokens(pixels, weight, bias):
    """pixels: [B, T, C, H, W]; weight: a Conv3d's [D, C, t, h, w] with stride = kernel -> [B, N, D], tokens
    ordered time step, then row, then column."""
    batch, frames, channels, height, width = pixels.shape
    width_out, _, t, h, w = weight.shape
    tubes = pixels.reshape(batch, frames // t, t, channels, height // h, h, width // w, w)
    tubes = tubes.permute(0, 1, 4, 6, 3, 2, 5, 7)  # [B, T', H', W', C, t, h, w]: the kernel's layout last
    tubes = tubes.reshape(batch, -1, channels * t * h * w)
    return tubes @ weight.reshape(width_out, -1).T + bias


def sincos_table(positions: int, width: int, dtype=torch.float64):
    """[N, D]: angle(n, j) = n / 10000^(2 floor(j / 2) / D); sin on even channels j, cos on odd ones."""
    n = torch.arange(positions, dtype=dtype)[:, None]
    j = torch.arange(width)
    angle = n / torch.pow(torch.tensor(10000.0, dtype=dtype), (2 * (j // 2)).to(dtype) / width)
    return torch.where(j % 2 == 0, angle.sin(), angle.cos())


def _encoder(x, layers, r_per_layer, p, heads, qkv, attn_out, mlp):
    """Pre-norm layers with ToMe: x += attn_out(attention(norm1(x)) with log(size)); merge r; x += mlp(norm2(x)).
    qkv(layer, h) -> (q, k, v) [B, N, C]; attn_out(layer, o); mlp(layer, h). x: [B, N, C] -> [B, N', C]."""
    size = torch.ones(x.shape[:2], dtype=x.dtype)
    for layer, r in zip(layers, r_per_layer):
        q, k, v = (_heads(t, heads) for t in qkv(layer, layer.layernorm_before(x)))
        x = x + attn_out(layer, _attention(q, k, v, size, q.shape[-1] ** -0.5))
        x, size, _ = _merge_all(x, size, k.mean(dim=1), max(0, min(r, (x.shape[1] - p) // 2)), p)
        x = x + mlp(layer, layer.layernorm_after(x))
    return x


def _videomae_qkv(layer, h):
    attn = layer.attention.attention  # the key has no bias; query and value have theirs (qv_bias)
    return attn.query(h), h @ attn.key.weight.T, attn.value(h)


def _videomae_mlp(layer, h):
    return layer.output.dense(torch.nn.functional.gelu(layer.intermediate.dense(h)))


@torch.no_grad()
def reference_videomae(model, pixels, r_per_layer, dtype=torch.float64):
    """VideoMAEForVideoClassification (use_mean_pooling, gelu) with ToMe: tubelet tokens plus the fixed sin-cos
    table, no prefix token, then logits = classifier(fc_norm(plain mean of the final tokens)). A VideoMAEModel
    gives that plain mean (its embedding). pixels: [B, T, 3, H, W]."""
    model = copy.deepcopy(model).to(dtype).eval()
    assert model.config.hidden_act == "gelu"
    base = getattr(model, "videomae", model)
    projection = base.embeddings.patch_embeddings.projection
    x = tubelet_tokens(pixels.to(dtype), projection.weight, projection.bias)
    x = x + sincos_table(x.shape[1], x.shape[2])
    x = _encoder(
        x,
        base.encoder.layer,
        r_per_layer,
        0,
        model.config.num_attention_heads,
        _videomae_qkv,
        lambda layer, o: layer.attention.output.dense(o),
        _videomae_mlp,
    )
    pooled = x.mean(dim=1)  # every merged token once, whatever its size
    if not hasattr(model, "classifier"):
        return pooled.float()
    return model.classifier(model.fc_norm(pooled)).float()


@torch.no_grad()
def reference_vivit(model, pixels, r_per_layer, dtype=torch.float64):
    """VivitForVideoClassification with ToMe: the class token, then tubelet tokens, plus the learned position
    table; the class token (prefix 1) never merges; logits = classifier(layernorm(x)[:, 0]). pixels: [B, T, 3, H, W]."""
    model = copy.deepcopy(model).to(dtype).eval()
    base = model.vivit
    embeddings = base.embeddings
    projection = embeddings.patch_embeddings.projection
    x = tubelet_tokens(pixels.to(dtype), projection.weight, projection.bias)
    x = torch.cat([embeddings.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + embeddings.position_embeddings
    x = _encoder(
        x,
        base.layers,
        r_per_layer,
        1,
        model.config.num_attention_heads,
        lambda layer, h: (layer.attention.q_proj(h), layer.attention.k_proj(h), layer.attention.v_proj(h)),
        lambda layer, o: layer.attention.o_proj(o),
        lambda layer, h: layer.mlp(h),
    )
    return model.classifier(base.layernorm(x)[:, 0]).float()
