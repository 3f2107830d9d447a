"""An independent, deliberately plain eager reference of Token Merging (the rules of docs/design.md).

Written from those rules only; it does NOT import tome_deploy. Matching and merging are done one
batch element at a time with Python loops and float64 arithmetic, so that the rules (A = even positions,
B = odd positions, protected prefix tokens, tie-breaks, output order) are easy to read and check.

Public helpers:
  reference_schedule(spec, depth)                 -> requested r per layer (the paper's parse_r rules)
  reference_match(metric, r, p)                   -> (src A indices, dst B indices, output order)
  reference_merge(x, size, src_a, dst_b, order)   -> merged tokens, sizes (size-weighted average)
  reference_tome_forward(model, pixels, r_layers) -> logits of a ToMe forward of a timm ViT
  reference_tome_features(...)                    -> final tokens, sizes and source groups
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------
def reference_schedule(spec, depth: int) -> list[int]:
    """int r -> r everywhere; (r, inflect) -> linear ramp truncated with int(); list -> padded with 0."""
    if isinstance(spec, list):
        return list(spec) + [0] * (depth - len(spec))
    if isinstance(spec, tuple):
        r, inflect = spec
        first = int(r * (1.0 - inflect))
        last = 2 * r - first
        step = (last - first) / (depth - 1)
        return [int(first + step * i) for i in range(depth)]
    return [spec] * depth


def reference_clamp(r_layers: Sequence[int], num_tokens: int, num_prefix: int) -> tuple[list[int], list[int]]:
    """Clamp every layer's r to (tokens - prefix) // 2; returns (effective r, tokens entering each layer + final)."""
    effective, tokens = [], [num_tokens]
    for r in r_layers:
        r_eff = min(r, (tokens[-1] - num_prefix) // 2)
        r_eff = max(r_eff, 0)
        effective.append(r_eff)
        tokens.append(tokens[-1] - r_eff)
    return effective, tokens


# ----------------------------------------------------------------------------------------------
# Bipartite soft matching for ONE batch element
# ----------------------------------------------------------------------------------------------
def _as_rows(metric) -> list[list[float]]:
    if isinstance(metric, torch.Tensor):
        metric = metric.detach().to("cpu", torch.float64).tolist()
    return [[float(v) for v in row] for row in metric]


def _unit(row: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in row))
    return [v / norm for v in row]


def reference_match(metric, r: int, p: int) -> tuple[list[int], list[int], list[int]]:
    """metric: [N, c] for one image; r: tokens to merge (already <= (N - p) // 2); p: prefix tokens.

    Returns
      src_a: A indices (position // 2) of the merged tokens, in score order (best first)
      dst_b: for each src, the B index (position // 2) of its destination
      order: the N - r output tokens as ORIGINAL token positions, in output order
    """
    rows = [_unit(row) for row in _as_rows(metric)]
    n = len(rows)
    a_positions = list(range(0, n, 2))
    b_positions = list(range(1, n, 2))
    assert 0 <= r <= (n - p) // 2, "r must be clamped before matching"

    # scores[i][j] = cos(A_i, B_j); prefix rows / columns are -inf.
    scores = []
    for pa in a_positions:
        row = []
        for pb in b_positions:
            if pa < p or pb < p:
                row.append(NEG_INF)
            else:
                row.append(sum(u * v for u, v in zip(rows[pa], rows[pb])))
        scores.append(row)

    # Best B partner per A token, ties -> lowest B index (strict '>' keeps the first maximum).
    best_score, best_b = [], []
    for i in range(len(a_positions)):
        top, top_j = NEG_INF, 0
        for j in range(len(b_positions)):
            if scores[i][j] > top:
                top, top_j = scores[i][j], j
        best_score.append(top)
        best_b.append(top_j)

    # Stable descending sort of A tokens by best score (Python's sort is stable: ties -> lower A index).
    by_score = sorted(range(len(a_positions)), key=lambda i: -best_score[i])
    src_a = by_score[:r]
    unmerged_a = by_score[r:]
    if p >= 1:
        unmerged_a = sorted(unmerged_a)
    dst_b = [best_b[i] for i in src_a]

    for i in src_a:
        assert a_positions[i] >= p, "a prefix token was chosen as a source"

    order = list(range(p))
    order += [a_positions[i] for i in unmerged_a if a_positions[i] >= p]
    order += [pb for pb in b_positions if pb >= p]
    assert len(order) == n - r
    return src_a, dst_b, order


def reference_merge(x, size, src_a: list[int], dst_b: list[int], order: list[int]):
    """x: [N, C], size: [N] (one image). Size-weighted average of every destination with its sources.

    Returns (tokens [N - r, C] float64, sizes [N - r] float64) in `order`.
    """
    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    size = torch.as_tensor(size).detach().to("cpu", torch.float64).reshape(-1)
    weighted = {pos: x[pos] * size[pos] for pos in range(x.shape[0])}
    total = {pos: size[pos].clone() for pos in range(x.shape[0])}
    for ia, jb in zip(src_a, dst_b):
        src_pos, dst_pos = 2 * ia, 2 * jb + 1
        weighted[dst_pos] = weighted[dst_pos] + x[src_pos] * size[src_pos]
        total[dst_pos] = total[dst_pos] + size[src_pos]
    tokens = torch.stack([weighted[pos] / total[pos] for pos in order])
    sizes = torch.stack([total[pos] for pos in order])
    return tokens, sizes


# ----------------------------------------------------------------------------------------------
# Full ToMe forward of a timm VisionTransformer, written from the model's submodules
# ----------------------------------------------------------------------------------------------
def reference_attention(attn, x: torch.Tensor, size: torch.Tensor):
    """Manual multi-head attention with proportional attention.

    x: [B, N, C], size: [B, N] -> (out [B, N, C], metric [B, N, head_dim] = keys after k_norm, head mean).
    """
    batch, tokens, _ = x.shape
    heads = attn.num_heads
    head_dim = attn.qkv.weight.shape[0] // (3 * heads)
    qkv = torch.nn.functional.linear(x, attn.qkv.weight, attn.qkv.bias)  # [B, N, 3 * H * hd]
    qkv = qkv.reshape(batch, tokens, 3, heads, head_dim)
    q = qkv[:, :, 0].transpose(1, 2)  # [B, H, N, hd]
    k = qkv[:, :, 1].transpose(1, 2)
    v = qkv[:, :, 2].transpose(1, 2)
    q = attn.q_norm(q)
    k = attn.k_norm(k)
    logits = (q @ k.transpose(-1, -2)) * (head_dim**-0.5)  # [B, H, N, N]
    logits = logits + size.log()[:, None, None, :]  # log(size_j) for every key j
    probs = logits.softmax(dim=-1)
    out = probs @ v  # [B, H, N, hd]
    out = out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    out = attn.norm(out)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    out = attn.proj(out)
    metric = k.mean(dim=1)  # [B, N, hd]
    return out, metric


@torch.no_grad()
def reference_tome_features(model, pixels: torch.Tensor, r_per_layer: Sequence[int], dtype=torch.float64):
    """Run the token part of a ToMe ViT (patch embedding ... final norm).

    Returns dict with
      tokens: [B, N_final, C] after model.norm (in `dtype`)
      size:   [B, N_final]
      groups: per image, per final token, the sorted list of input token positions it contains
      r_effective: the r each layer merged
      model: the (dtype-cast, eval) copy used, so its head can be applied
    """
    model = copy.deepcopy(model).to(dtype).eval()
    pixels = pixels.to(dtype)
    p = int(model.num_prefix_tokens)
    assert len(r_per_layer) == len(model.blocks)

    x = model.patch_embed(pixels)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    batch, n0, _ = x.shape
    size = torch.ones(batch, n0, dtype=dtype)
    groups = [[[j] for j in range(n0)] for _ in range(batch)]
    r_effective = []

    for block, r in zip(model.blocks, r_per_layer):
        attn_out, metric = reference_attention(block.attn, block.norm1(x), size)
        x = x + block.drop_path1(block.ls1(attn_out))

        n = x.shape[1]
        r_eff = max(0, min(r, (n - p) // 2))
        r_effective.append(r_eff)
        if r_eff > 0:
            new_x, new_size, new_groups = [], [], []
            for b in range(batch):
                src_a, dst_b, order = reference_match(metric[b], r_eff, p)
                tokens_b, size_b = reference_merge(x[b], size[b], src_a, dst_b, order)
                new_x.append(tokens_b.to(dtype))
                new_size.append(size_b.to(dtype))
                members = {pos: list(groups[b][pos]) for pos in range(n)}
                for ia, jb in zip(src_a, dst_b):
                    members[2 * jb + 1] += groups[b][2 * ia]
                new_groups.append([sorted(members[pos]) for pos in order])
            x = torch.stack(new_x)
            size = torch.stack(new_size)
            groups = new_groups

        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    x = model.norm(x)
    return {"tokens": x, "size": size, "groups": groups, "r_effective": r_effective, "model": model}


@torch.no_grad()
def reference_tome_forward(model, pixels: torch.Tensor, r_per_layer: Sequence[int], dtype=torch.float64):
    """Logits of a ToMe forward pass (computed in `dtype`, returned as float32)."""
    out = reference_tome_features(model, pixels, r_per_layer, dtype)
    return out["model"].forward_head(out["tokens"]).float()


# ----------------------------------------------------------------------------------------------
# The fused merge op (tome::TokenMerge) on arbitrary token positions
# ----------------------------------------------------------------------------------------------
def reference_token_merge(x, size, kept, source, destination):
    """x [B, N, C], size [B, N, 1], kept [B, N - r], source/destination [B, r] as token positions.

    float64, one output token at a time: itself plus every source whose destination it is, averaged
    by size. Returns (tokens [B, N - r, C], sizes [B, N - r, 1]) in float64.
    """
    batch, _, channels = x.shape
    out_x = torch.zeros(batch, kept.shape[1], channels, dtype=torch.float64)
    out_size = torch.zeros(batch, kept.shape[1], 1, dtype=torch.float64)
    for b in range(batch):
        pairs = list(zip(source[b].tolist(), destination[b].tolist()))
        for i, pos in enumerate(kept[b].tolist()):
            members = [pos] + [src for src, dst in pairs if dst == pos]
            total = sum(float(size[b, m, 0]) for m in members)
            out_x[b, i] = sum(x[b, m].double() * float(size[b, m, 0]) for m in members) / total
            out_size[b, i, 0] = total
    return out_x, out_size
