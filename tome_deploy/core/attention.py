"""Scaled dot-product attention for every family's ToMe block, with ToMe's proportional bias.

Eagerly it is torch's fused F.scaled_dot_product_attention. While onnx_export traces a model
(`core.tracing`), it is the same math as MatMul/Softmax: the exporter's SDPA decomposition
reshapes q/k/v to computed shapes, which leaves ONNX shape inference with unknown dims along the whole
attention path (docs/design.md#export-rules: only the batch may stay symbolic).

Shapes: B batch, H heads, N query tokens, M key tokens, hd head dim."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tome_deploy.core.tracing import exporting_onnx


def scaled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    dropout: float = 0.0,
    fused: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v.

    q: [B, H, N, hd], k and v: [B, H, M, hd], bias: additive logits broadcastable to [B, H, N, M] (ToMe's
    [B, 1, 1, M] log-size bias) or None; scale defaults to hd^-0.5. fused=False takes the explicit form
    eagerly too (a model whose attention the user switched off fusion for, as timm's fused_attn does).
    -> [B, H, N, hd]
    """
    if fused and not exporting_onnx():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)  # [B, H, N, M]
    if bias is not None:
        logits = logits + bias
    return F.dropout(logits.softmax(dim=-1), p=dropout, training=dropout > 0) @ v  # [B, H, N, hd]
