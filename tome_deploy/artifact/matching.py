"""Where a ToMe graph matches: the nodes that stay fp32 in a reduced-precision export, and the tensors that
hold each block's merge choices. Read from the ONNX graph itself, without torch.

The exporter tags every node with the PyTorch module scope it came from; every matching and merging node
sits under a block's `TokenMerger` (scope `...layers.<block>.merger`): the keys' mean over heads, their
normalisation, the scores, the best match, the order and the size-weighted merge. `log(size)`, the
proportional-attention bias, is computed in the block itself and found by its op (Log): a ToMe graph has
no other Log. (docs/design.md#precision)"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
_MERGER_SCOPE = re.compile(r"layers\.(\d+)\.merger$")


@dataclass(frozen=True)
class MatchTensors:
    """The tensors of one merging block's choice: `source` [B, r, 1] (the A' indices merged away, in score
    order) and `destination` [B, r, 1] (the B' index each one merges into)."""

    block: int
    source: str
    destination: str


def _merger_block(node) -> int | None:
    """The block index of a node under a TokenMerger scope, else None."""
    for prop in node.metadata_props:
        if prop.key == SCOPE_KEY:
            scopes = [s.strip(" '") for s in prop.value.strip("[]").split(",")]
            for scope in scopes:
                found = _MERGER_SCOPE.search(scope)
                if found:
                    return int(found.group(1))
    return None


def matching_nodes(model_proto) -> set[str]:
    """Names of the nodes that stay fp32 in every precision: everything under a TokenMerger, and log(size)."""
    return {node.name for node in model_proto.graph.node if node.op_type == "Log" or _merger_block(node) is not None}


def match_tensors(model_proto) -> list[MatchTensors]:
    """Each merging block's choice tensors, in block order. The destination is the one GatherElements of a
    TokenMerger (the best B' of each chosen A' token); its index input is the chosen sources."""
    found = []
    for node in model_proto.graph.node:
        block = _merger_block(node)
        if block is not None and node.op_type == "GatherElements":
            found.append(MatchTensors(block, source=node.input[1], destination=node.output[0]))
    return sorted(found, key=lambda match: match.block)
