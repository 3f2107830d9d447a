"""The contract of `tome::TokenMerge`, read by every implementation and by the exporter.

One ToMe merge step, fused: gather the kept tokens and give each one the size-weighted average of itself
and the tokens merged into it, in one pass, with no index expanded over channels.

Inputs (B batch, N tokens in, C channels, r tokens merged away, N - r tokens out):
    x            [B, N, C]   T      tokens; T is float32 or float16
    size         [B, N, 1]   float32 patch counts (> 0) of each token
    kept         [B, N - r]  int32  positions (into N) of the output tokens, in output order
    source       [B, r]      int32  positions merged away
    destination  [B, r]      int32  destination[b, j] is the position source[b, j] merges into
Outputs:
    merged_x     [B, N - r, C]  T
    merged_size  [B, N - r, 1]  float32

Semantics, for output token i of image b, with p = kept[b, i]:
    acc   = x[b, p] * size[b, p]            (x widened to float32; every step below in float32)
    total = size[b, p]
    for j = 0, 1, ..., r - 1                 (ascending j: the fixed summation order, no atomics)
        if destination[b, j] == p:
            acc   = acc + x[b, source[b, j]] * size[b, source[b, j]]
            total = total + size[b, source[b, j]]
    merged_x[b, i]    = T(acc / total)       (IEEE division, round to nearest; then one rounding to T)
    merged_size[b, i] = total
Sources contribute their input values (a source that is also a destination is not chained). Every
index must lie in [0, N); kernels do not bounds-check. With matching's Match the output order is
exactly merge_weighted's: [prefix tokens, unmerged A, B]; sources are listed best score first, so
that is the summation order. Products are rounded before they are added (no fused multiply-add), so
every implementation following these steps gives the same bits; merge_weighted's scatter/matmul
formulations sum in their own order and agree to within float32 rounding.

ONNX: a node `TokenMerge` in domain `tome` (opset version 1) with string attributes
plugin_namespace="tome" and plugin_version="1", which TensorRT's ONNX parser uses to find the plugin
`tome::TokenMerge` (never an ONNX local function: the parser would inline it instead).
"""

from __future__ import annotations

from typing import Any

from tome_deploy.errors import InvalidInputError

OP_DOMAIN = "tome"
OP_TYPE = "TokenMerge"
OP_DOMAIN_VERSION = 1
TORCH_OP = "tome::token_merge"
PLUGIN_NAMESPACE = "tome"
PLUGIN_VERSION = "1"  # TensorRT's Python plugins are always version "1"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{OP_TYPE}"
NODE_ATTRIBUTES = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}

INPUTS = ("x", "size", "kept", "source", "destination")
OUTPUTS = ("merged_x", "merged_size")
X_DTYPES = ("float32", "float16")
SIZE_DTYPE = "float32"
INDEX_DTYPE = "int32"


def _dtype_name(dtype: Any) -> str:
    """torch.float16 / numpy.dtype('float16') / 'float16' -> 'float16'."""
    return str(dtype).rsplit(".", 1)[-1]


def check_inputs(x, size, kept, source, destination) -> None:
    """Raise InvalidInputError unless the five arrays (torch or numpy) follow the contract's shapes and dtypes."""
    problems = []
    if len(x.shape) != 3:
        problems.append(f"x must be [B, N, C], got shape {tuple(x.shape)}")
    else:
        batch, tokens, _ = x.shape
        expected = {
            "size": (size, (batch, tokens, 1)),
            "kept": (kept, (batch, None)),
            "source": (source, (batch, None)),
            "destination": (destination, (batch, None)),
        }
        for name, (array, shape) in expected.items():
            got = tuple(array.shape)
            if len(got) != len(shape) or any(want is not None and g != want for g, want in zip(got, shape)):
                problems.append(f"{name} must be {list(s if s is not None else '*' for s in shape)}, got {list(got)}")
        if not problems:
            if source.shape[1] != destination.shape[1]:
                problems.append(
                    f"source and destination must both be [B, r], got r={source.shape[1]} and r={destination.shape[1]}"
                )
            elif kept.shape[1] + source.shape[1] != tokens:
                problems.append(
                    f"kept ({kept.shape[1]}) + source ({source.shape[1]}) must be the N={tokens} input tokens"
                )
    if _dtype_name(x.dtype) not in X_DTYPES:
        problems.append(f"x must be {' or '.join(X_DTYPES)}, got {_dtype_name(x.dtype)}")
    if _dtype_name(size.dtype) != SIZE_DTYPE:
        problems.append(f"size must be {SIZE_DTYPE}, got {_dtype_name(size.dtype)}")
    for name, array in (("kept", kept), ("source", source), ("destination", destination)):
        if _dtype_name(array.dtype) != INDEX_DTYPE:
            problems.append(f"{name} must be {INDEX_DTYPE}, got {_dtype_name(array.dtype)}")
    if problems:
        raise InvalidInputError(
            f"{OP_TYPE} inputs break its contract: {'; '.join(problems)}; see tome_deploy/token_merge/contract.py"
        )


def output_shapes(x_shape, kept_shape) -> tuple[tuple, tuple]:
    """([B, N, C], [B, N - r]) -> (merged_x [B, N - r, C], merged_size [B, N - r, 1])."""
    batch, merged_tokens = kept_shape
    return (batch, merged_tokens, x_shape[2]), (batch, merged_tokens, 1)


def is_token_merge_node(node) -> bool:
    return node.op_type == OP_TYPE and node.domain == OP_DOMAIN


def graph_has_token_merge(model_proto) -> bool:
    """Whether an ONNX model (onnx.ModelProto) contains a tome::TokenMerge node, e.g. to register the plugin."""
    return any(is_token_merge_node(node) for node in model_proto.graph.node)


def onnx_schema():
    """The contract as an ONNX OpSchema, so onnx's checker and onnxscript know the node."""
    from onnx.defs import OpSchema

    param, attribute = OpSchema.FormalParameter, OpSchema.Attribute
    return OpSchema(
        OP_TYPE,
        OP_DOMAIN,
        OP_DOMAIN_VERSION,
        (__doc__ or "").strip(),
        inputs=[
            param("x", "T"),
            param("size", "S"),
            param("kept", "I"),
            param("source", "I"),
            param("destination", "I"),
        ],
        outputs=[param("merged_x", "T"), param("merged_size", "S")],
        type_constraints=[
            ("T", [f"tensor({'float' if d == 'float32' else d})" for d in X_DTYPES], "token dtype"),
            ("S", ["tensor(float)"], "sizes are float32"),
            ("I", [f"tensor({INDEX_DTYPE})"], "token positions"),
        ],
        attributes=[
            attribute(name, OpSchema.AttrType.STRING, f"TensorRT plugin lookup, always {value!r}")
            for name, value in NODE_ATTRIBUTES.items()
        ],
    )


def register_onnx_schema() -> None:
    """Make tome::TokenMerge known to onnx in this process (idempotent)."""
    import onnx.defs

    if not onnx.defs.has(OP_TYPE, OP_DOMAIN):
        onnx.defs.register_schema(onnx_schema())
