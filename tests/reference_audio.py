"""A plain float64 ToMe reference for transformers' Audio Spectrogram Transformer (ASTForAudioClassification /
ASTModel), written from the model's published forward and the rules of docs/design.md, NOT from tome_deploy.

The patch embedding is spelled out patch by patch: the spectrogram [B, time, mel] is read as an image with mel
as rows and time as columns; the 16 x 16 window at (frequency f, time t) starts at row f * frequency_stride and
column t * time_stride (windows overlap when a stride is below 16), and the tokens run frequency-major. Then the
class and distillation tokens go in front, the position embeddings are added, and every pre-norm layer runs with
proportional attention and bipartite soft matching (reference_families' transformers layer, two protected
prefix tokens); the final layernorm, the mean of the two prefix tokens, and the classifier head."""

from __future__ import annotations

import copy

import torch
from reference_families import _hf_encoder


def reference_patches(embeddings, spectrogram):
    """spectrogram [B, time, mel] -> patch tokens [B, F * T, C], one explicit window at a time."""
    config = embeddings.config
    conv = embeddings.patch_embeddings.projection
    weight, bias = conv.weight[:, 0], conv.bias  # [C, 16 (mel), 16 (time)], [C]
    patch = config.patch_size
    image = spectrogram.transpose(1, 2)  # [B, mel, time]: mel rows, time columns
    rows = (image.shape[1] - patch) // config.frequency_stride + 1
    cols = (image.shape[2] - patch) // config.time_stride + 1
    tokens = []
    for f in range(rows):
        for t in range(cols):
            top, left = f * config.frequency_stride, t * config.time_stride
            window = image[:, top : top + patch, left : left + patch]  # [B, 16, 16]
            tokens.append(torch.einsum("bij,cij->bc", window, weight) + bias)
    return torch.stack(tokens, dim=1)


@torch.no_grad()
def reference_hf_ast(model, spectrogram, r_per_layer, dtype=torch.float64):
    """ToMe forward of ASTForAudioClassification (logits) or ASTModel (pooler_output) in `dtype`, as float32."""
    model = copy.deepcopy(model).to(dtype).eval()
    encoder = getattr(model, "audio_spectrogram_transformer", model)
    embeddings = encoder.embeddings
    patches = reference_patches(embeddings, spectrogram.to(dtype))
    batch = patches.shape[0]
    prefix = torch.cat(
        [embeddings.cls_token.expand(batch, -1, -1), embeddings.distillation_token.expand(batch, -1, -1)], dim=1
    )
    x = torch.cat([prefix, patches], dim=1) + embeddings.position_embeddings
    names = ("layernorm_before", "attention", "layernorm_after", "mlp")
    x = _hf_encoder(x, encoder.layers, r_per_layer, 2, model.config.num_attention_heads, names)
    x = encoder.layernorm(x)
    pooled = (x[:, 0] + x[:, 1]) / 2
    classifier = getattr(model, "classifier", None)
    return (pooled if classifier is None else classifier.dense(classifier.layernorm(pooled))).float()
