"""Plain eager ToMe references for the timm Eva, Hugging Face (ViT, DeiT with teacher, CLIP vision, SigLIP
vision, DINOv2), OpenCLIP and torchvision VisionTransformer families.

Written from the rules of docs/design.md and the families' published forward passes, NOT from tome_deploy: each
block is spelled out from the model's own weights in float64 (attention by hand: q k^T * scale + log(size),
softmax, times v), matching and merging one image at a time with reference_tome.reference_match /
reference_merge. The RoPE rule (ours, see docs/model-families.md): every token carries the rotary angles of the patch it
started at; a merged token keeps its destination's angles. The head rule (docs/model-families.md): heads see the
merged tokens without their sizes, so SigLIP's attention-pooling head weighs every merged token once.
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
        out = attn.proj(attn.norm(_attention(q, k, v, size, attn.head_dim**-0.5)))
        x = x + (out if block.gamma_1 is None else block.gamma_1 * out)
        r = max(0, min(r, (x.shape[1] - p) // 2))
        ids = torch.cat([torch.full((batch, p), -1), position], dim=1)
        x, size, ids = _merge_all(x, size, k.mean(dim=1), r, p, ids)
        position = ids[:, p:]
        mlp = block.mlp(block.norm2(x))
        x = x + (mlp if block.gamma_2 is None else block.gamma_2 * mlp)
    return model.forward_head(model.norm(x)).float()


def _hf_layer(x, size, r, p, heads, norm1, attn, norm2, mlp, scale1=None, scale2=None):
    """One pre-norm transformers encoder layer with ToMe: attention on norm1(x) with log(size), times the layer
    scale when there is one, merge r, then the MLP on norm2(x). x: [B, N, C], size: [B, N] -> N - r tokens."""
    h = norm1(x)
    q, k, v = (_heads(proj(h), heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out_proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    out = out_proj(_attention(q, k, v, size, q.shape[-1] ** -0.5))
    x = x + (out if scale1 is None else scale1 * out)
    x, size, _ = _merge_all(x, size, k.mean(dim=1), max(0, min(r, (x.shape[1] - p) // 2)), p)
    out = mlp(norm2(x))
    return x + (out if scale2 is None else scale2 * out), size


def _hf_encoder(x, layers, r_per_layer, p, heads, names, scales=None):
    """Every layer of `layers`; names: (norm1, attention, norm2, mlp) attribute names; scales(layer) -> the
    two layer-scale vectors (DINOv2) or None. x: [B, N, C] -> [B, N', C]."""
    size = torch.ones(x.shape[:2], dtype=x.dtype)
    for layer, r in zip(layers, r_per_layer):
        norm1, attn, norm2, mlp = (getattr(layer, n) for n in names)
        scale1, scale2 = scales(layer) if scales else (None, None)
        x, size = _hf_layer(x, size, r, p, heads, norm1, attn, norm2, mlp, scale1, scale2)
    return x


_VIT_NAMES = ("layernorm_before", "attention", "layernorm_after", "mlp")  # ViT and DeiT layers
_CLIP_NAMES = ("layer_norm1", "self_attn", "layer_norm2", "mlp")  # CLIP and SigLIP layers


@torch.no_grad()
def reference_hf_vit(model, pixels, r_per_layer, dtype=torch.float64):
    """ToMe forward of transformers' ViTForImageClassification (class token at 0): the logits."""
    model = copy.deepcopy(model).to(dtype).eval()
    x = model.vit.embeddings(pixels.to(dtype))
    x = _hf_encoder(x, model.vit.layers, r_per_layer, 1, model.config.num_attention_heads, _VIT_NAMES)
    return model.classifier(model.vit.layernorm(x)[:, 0]).float()


@torch.no_grad()
def reference_hf_deit_teacher(model, pixels, r_per_layer, dtype=torch.float64):
    """DeiTForImageClassificationWithTeacher: class token at 0 and distillation token at 1, both protected;
    logits = mean of the class head on token 0 and the distillation head on token 1."""
    model = copy.deepcopy(model).to(dtype).eval()
    x = model.deit.embeddings(pixels.to(dtype))
    x = _hf_encoder(x, model.deit.layers, r_per_layer, 2, model.config.num_attention_heads, _VIT_NAMES)
    x = model.deit.layernorm(x)
    return ((model.cls_classifier(x[:, 0]) + model.distillation_classifier(x[:, 1])) / 2).float()


@torch.no_grad()
def reference_hf_clip(model, pixels, r_per_layer, dtype=torch.float64):
    """CLIPVisionModel: pre_layrnorm after the embeddings, class token at 0, post_layernorm on the class
    token (pooler_output); CLIPVisionModelWithProjection: that times visual_projection (image_embeds)."""
    model = copy.deepcopy(model).to(dtype).eval()
    vision = getattr(model, "vision_model", model)
    x = vision.pre_layrnorm(vision.embeddings(pixels.to(dtype)))
    x = _hf_encoder(x, vision.encoder.layers, r_per_layer, 1, model.config.num_attention_heads, _CLIP_NAMES)
    pooled = vision.post_layernorm(x[:, 0])
    projection = getattr(model, "visual_projection", None)
    return (pooled if projection is None else projection(pooled)).float()


def _pooling_head(head, x):
    """SigLIP's attention-pooling head on the final tokens x: [B, N, C] -> [B, C]. One learned probe query
    attends to the tokens; every token counts once, whatever its size (the model's head unchanged, as the
    docs/model-families.md says), then the head's residual MLP."""
    attn, batch = head.attention, x.shape[0]
    probe = head.probe.expand(batch, -1, -1)  # [B, 1, C]
    w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
    b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
    q = _heads(torch.nn.functional.linear(probe, w_q, b_q), attn.num_heads)  # [B, H, 1, hd]
    k, v = (_heads(torch.nn.functional.linear(x, w, b), attn.num_heads) for w, b in ((w_k, b_k), (w_v, b_v)))
    unit = torch.ones(x.shape[:2], dtype=x.dtype)  # log(1) = 0: no size in the pooling attention
    h = attn.out_proj(_attention(q, k, v, unit, q.shape[-1] ** -0.5))  # [B, 1, C]
    return (h + head.mlp(head.layernorm(h)))[:, 0]


@torch.no_grad()
def reference_hf_siglip(model, pixels, r_per_layer, dtype=torch.float64):
    """SiglipVisionModel: no prefix token (unmerged A tokens stay in score order), post_layernorm on every
    token, then the attention-pooling head on the merged tokens (pooler_output)."""
    model = copy.deepcopy(model).to(dtype).eval()
    x = model.embeddings(pixels.to(dtype))
    x = _hf_encoder(x, model.encoder.layers, r_per_layer, 0, model.config.num_attention_heads, _CLIP_NAMES)
    return _pooling_head(model.head, model.post_layernorm(x)).float()


def _dinov2_scales(layer):
    """DINOv2's LayerScale vectors of the attention and MLP branches."""
    return layer.layer_scale1.lambda1, layer.layer_scale2.lambda1


@torch.no_grad()
def reference_hf_dinov2(model, pixels, r_per_layer, dtype=torch.float64):
    """Dinov2Model / Dinov2WithRegistersModel: class token at 0 and the registers after it, all protected;
    LayerScale (lambda1) on both branches; pooler_output = the final layernorm's class token."""
    model = copy.deepcopy(model).to(dtype).eval()
    p = 1 + getattr(model.config, "num_register_tokens", 0)
    x = model.embeddings(pixels.to(dtype))
    x = _hf_encoder(
        x,
        model.encoder.layer,
        r_per_layer,
        p,
        model.config.num_attention_heads,
        ("norm1", "attention", "norm2", "mlp"),
        _dinov2_scales,
    )
    return model.layernorm(x)[:, 0].float()


@torch.no_grad()
def reference_open_clip(visual, pixels, r_per_layer, dtype=torch.float64):
    """ToMe forward of an OpenCLIP VisionTransformer (class-token pooling): the image embedding."""
    visual = copy.deepcopy(visual).to(dtype).eval()
    x = visual._embeds(pixels.to(dtype))
    batch, n0, width = x.shape
    size = torch.ones(batch, n0, dtype=dtype)
    for block, r in zip(visual.transformer.resblocks, r_per_layer):
        attn, h = block.attn, block.ln_1(x)
        q, k, v = (
            _heads(t, attn.num_heads)
            for t in torch.nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
        )
        x = x + block.ls_1(attn.out_proj(_attention(q, k, v, size, (width // attn.num_heads) ** -0.5)))
        x, size, _ = _merge_all(x, size, k.mean(dim=1), max(0, min(r, (x.shape[1] - 1) // 2)), 1)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return (visual.ln_post(x[:, 0]) @ visual.proj).float()


@torch.no_grad()
def reference_torchvision(model, pixels, r_per_layer, dtype=torch.float64):
    """ToMe forward of a torchvision VisionTransformer: conv_proj patches (row by row), the class token at 0,
    encoder.pos_embedding, pre-norm EncoderBlocks (ln_1, nn.MultiheadAttention from its packed in_proj, ln_2,
    MLP), encoder.ln, then heads on the class token: the logits."""
    model = copy.deepcopy(model).to(dtype).eval()
    patches = model.conv_proj(pixels.to(dtype)).flatten(2).transpose(1, 2)  # [B, rows * cols, C]
    batch = patches.shape[0]
    x = torch.cat([model.class_token.expand(batch, -1, -1), patches], dim=1) + model.encoder.pos_embedding
    size = torch.ones(x.shape[:2], dtype=dtype)
    for block, r in zip(model.encoder.layers, r_per_layer):
        attn, h = block.self_attention, block.ln_1(x)
        q, k, v = (
            _heads(t, attn.num_heads)
            for t in torch.nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1)
        )
        x = x + attn.out_proj(_attention(q, k, v, size, q.shape[-1] ** -0.5))
        x, size, _ = _merge_all(x, size, k.mean(dim=1), max(0, min(r, (x.shape[1] - 1) // 2)), 1)
        x = x + block.mlp(block.ln_2(x))
    return model.heads(model.encoder.ln(x)[:, 0]).float()
