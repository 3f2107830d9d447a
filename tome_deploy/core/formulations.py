"""The built-in summing formulations, registered by artifact/formulations.py: `scatter` and `matmul`.

Imports no torch at module level (`tome-export --help` and torch-free metadata readers list every
formulation); the adders import core.merge when they are first called.
"""

from __future__ import annotations

from typing import Any, Callable

from tome_deploy.artifact.formulations import MergeFormulation
from tome_deploy.artifact.spec import TARGETS


def scatter_rows(destination: Any, num_rows: int) -> Callable[[Any, Any], Any]:
    """core.merge.scatter_row_adder: destination [B, r, 1] -> add(x [B, num_rows, C], src [B, r, C])."""
    from tome_deploy.core.merge import scatter_row_adder

    return scatter_row_adder(destination, num_rows)


def onehot_rows(destination: Any, num_rows: int) -> Callable[[Any, Any], Any]:
    """core.merge.onehot_row_adder: destination [B, r, 1] -> add(x [B, num_rows, C], src [B, r, C])."""
    from tome_deploy.core.merge import onehot_row_adder

    return onehot_row_adder(destination, num_rows)


SCATTER = MergeFormulation(
    name="scatter",
    description="ScatterND add on whole rows",
    targets=("onnxruntime",),
    runtimes=("onnxruntime", "openvino"),
    refusals={"tensorrt": "TensorRT's ONNX parser does not support ScatterND's sum (the `scatter` merge)"},
    row_adder=scatter_rows,
)
MATMUL = MergeFormulation(
    name="matmul",
    description="one-hot, no scatter op; for TensorRT",
    targets=TARGETS,
    runtimes=("onnxruntime", "openvino", "tensorrt"),
    row_adder=onehot_rows,
)
FORMULATIONS = (SCATTER, MATMUL)
