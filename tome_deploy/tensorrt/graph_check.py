"""Read an ONNX graph before TensorRT does: refuse what the chosen backend cannot run, with the fix.

The parser's own messages for these cases name a node deep inside the graph and say nothing about how
to re-export; this check names the node and the `tome-export` flags that avoid it."""

from __future__ import annotations

from dataclasses import dataclass, field

from tome_deploy.errors import InvalidInputError
from tome_deploy.runtime.tensorrt_backend import TensorRTBackend
from tome_deploy.token_merge.contract import is_token_merge_node


class UnsupportedGraphError(InvalidInputError):
    """A graph the chosen TensorRT backend cannot build; the message says how to export one it can."""


@dataclass
class GraphCheck:
    warnings: list[str] = field(default_factory=list)
    needs_token_merge_plugin: bool = False
    needs_nvidia_plugins: bool = False  # ScatterElements(add) is in NVIDIA's plugin library


def _scatter_reduction(node) -> str:
    for attribute in node.attribute:
        if attribute.name == "reduction":
            return attribute.s.decode()
    return "none"


def check_graph(model_proto, backend: TensorRTBackend) -> GraphCheck:
    """Raise UnsupportedGraphError for the first node `backend` cannot run; collect warnings for the rest."""
    check = GraphCheck()
    reducing_scatters = []
    for node in model_proto.graph.node:
        if node.op_type == "ScatterND" and _scatter_reduction(node) != "none":
            # TensorRT's ONNX parser: "ScatterND with reduction is not supported" (TensorRT-RTX's, measured;
            # TensorRT 8.6's silently dropped the reduction, onnx-tensorrt issue 957).
            raise UnsupportedGraphError(
                f"node {node.name!r} is ScatterND(reduction={_scatter_reduction(node)}) (the `scatter` merge), "
                f"whose sum {backend.name} does not support; re-export with tome-export ... --target tensorrt "
                "(or --merge matmul)"
            )
        if node.op_type == "ScatterElements" and _scatter_reduction(node) != "none":
            reducing_scatters.append(node.name or node.op_type)
        elif is_token_merge_node(node):
            if not backend.runs_python_plugins:
                raise UnsupportedGraphError(
                    f"node {node.name!r} is the fused tome::TokenMerge plugin, which {backend.name} cannot load "
                    "(it needs full TensorRT >= 10.9 and its tensorrt.plugin module); re-export with "
                    "tome-export ... --target tensorrt (one-hot matmul merge) or build with --backend tensorrt"
                )
            check.needs_token_merge_plugin = True
        elif node.domain not in ("", "ai.onnx"):
            raise UnsupportedGraphError(
                f"node {node.name!r} is {node.domain}::{node.op_type}, a custom op no TensorRT backend knows; "
                "export without it"
            )
    if reducing_scatters:  # a `scatter` export of tome-deploy 0.1 (ScatterElements since then only eagerly)
        if not backend.runs_scatter_reduction:
            raise UnsupportedGraphError(
                f"node {reducing_scatters[0]!r} is ScatterElements(reduction=add) (the `scatter` merge), which "
                f"{backend.name} rejects; re-export with tome-export ... --target tensorrt (or --merge matmul)"
            )
        check.needs_nvidia_plugins = True
        check.warnings.append(
            f"{len(reducing_scatters)} ScatterElements(add) nodes (the `scatter` merge) run on NVIDIA's "
            "ScatterElements plugin, which sums with atomics: outputs can differ from run to run; "
            "re-export with --target tensorrt for a deterministic engine"
        )
    return check
