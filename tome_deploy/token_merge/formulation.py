"""The `plugin` merge formulation (registered by artifact/formulations.py): one fused tome::TokenMerge op
per merging block, with the runtime hooks that make the op known to ONNX Runtime and TensorRT.

Imports no torch at module level (`tome-export --help` and torch-free metadata readers list every
formulation); each part imports its implementation when it is first used.
"""

from __future__ import annotations

from typing import Any, Callable

from tome_deploy.artifact.formulations import MergeFormulation
from tome_deploy.artifact.spec import TARGETS
from tome_deploy.token_merge import contract


def fused_merge(x: Any, size: Any, match: Any) -> tuple[Any, Any]:
    """torch_op.merge_weighted_fused: x [B, N, C], size [B, N, 1] -> ([B, N - r, C], [B, N - r, 1])."""
    from tome_deploy.token_merge.torch_op import merge_weighted_fused

    return merge_weighted_fused(x, size, match)


def sum_rows(destination: Any, num_rows: int) -> Callable[[Any, Any], Any]:
    """Plain sums (source tracking) under the plugin, which fuses only the size-weighted average: the
    one-hot adder, core.merge.onehot_row_adder (destination [B, r, 1] -> add(x [B, num_rows, C], src [B, r, C]))."""
    from tome_deploy.core.merge import onehot_row_adder

    return onehot_row_adder(destination, num_rows)


def onnx_translations() -> dict:
    """The exporter's translation of the op: one tome::TokenMerge node (onnx_translation.py)."""
    from tome_deploy.token_merge.onnx_translation import custom_translation_table

    return custom_translation_table()


def require_onnxruntime_extensions() -> None:
    """ONNX Runtime runs tome::TokenMerge only through onnxruntime-extensions: fail early, naming the extra.
    (The op itself is registered per session by ort_op.session_model, for every graph that holds it.)"""
    from tome_deploy.token_merge.ort_op import require_extensions

    require_extensions()


def register_tensorrt_plugin() -> None:
    """tensorrt_plugin.register_tensorrt_plugin: TensorRT finds tome::TokenMerge in its plugin registry."""
    from tome_deploy.token_merge.tensorrt_plugin import register_tensorrt_plugin as register

    register()


PLUGIN = MergeFormulation(
    name="plugin",
    description=f"one fused {contract.PLUGIN_ID} node per block; needs pip install 'tome-deploy[plugin]'",
    targets=TARGETS,
    runtimes=("onnxruntime", "tensorrt"),
    refusals={"openvino": f"OpenVINO has no {contract.PLUGIN_ID} op"},
    row_adder=sum_rows,
    fused_merge=fused_merge,
    custom_op=contract.PLUGIN_ID,
    onnx_translations=onnx_translations,
    runtime_hooks={"onnxruntime": require_onnxruntime_extensions, "tensorrt": register_tensorrt_plugin},
)
FORMULATIONS = (PLUGIN,)
