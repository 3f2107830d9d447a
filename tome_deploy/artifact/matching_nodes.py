"""Which nodes of an exported ToMe graph decide and carry out the merges, found from the graph alone.

The exporter tags every ONNX node with the PyTorch module scopes it came from. Nodes under a `TokenMerger`
scope (`...merger`) are matching and merging: the keys' mean over heads, its normalisation, the score MatMul
(`a @ b^T`), the best match, the score order, the gathers and the scatter of the merge. Proportional
attention adds one more chain outside that scope: the next block's `log(size)` bias, which starts at a `Log`
of a size the merger wrote and ends where it is added to the attention logits. Together they are the
matching subgraph that reduced precision must leave in fp32 (docs/design.md#precision). Imports onnx only."""

from __future__ import annotations

SCOPE_KEY = "pkg.torch.onnx.name_scopes"  # the exporter's metadata_props key: the module scopes of a node
MERGER_SCOPE = ".merger"  # a ToMe block's TokenMerger attribute, as it appears in a scope path


def merger_node_names(graph) -> set[str]:
    """Names of the nodes of `graph` (onnx.GraphProto) under a TokenMerger scope: matching and merging."""
    names = set()
    for node in graph.node:
        scopes = {p.key: p.value for p in node.metadata_props}.get(SCOPE_KEY, "")
        if MERGER_SCOPE in scopes:
            names.add(node.name)
    return names


def matching_node_names(graph) -> set[str]:
    """Names of every node that must stay in fp32: the TokenMerger nodes, and each `log(size)` chain that
    starts at a `Log` of a TokenMerger output and runs through nodes with that one non-constant input (the
    bias's Transpose and Unsqueeze), up to the node that adds it to the attention logits (not included)."""
    merger = merger_node_names(graph)
    produced_by = {output: node.name for node in graph.node for output in node.output}
    constants = {init.name for init in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    chain = set()
    for node in graph.node:  # nodes are in topological order, so a chain's earlier nodes are seen first
        computed = [name for name in node.input if name and name not in constants]
        if len(computed) != 1 or node.name in merger:
            continue
        producer = produced_by.get(computed[0])
        if (node.op_type == "Log" and producer in merger) or producer in chain:
            chain.add(node.name)
    return merger | chain
