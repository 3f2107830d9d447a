"""bf16 for OpenVINO with fp32 matching: the precision is written into the IR's element types.

Every MatMul of the transformer (attention projections, the MLP, and the attention's two products) gets
its inputs converted to bf16 and its result converted back to f32; every other node (the matching
subgraph, log(size), norms, softmax, GELU and the residual stream) computes in f32. Run with OpenVINO's
inference precision f32 (what the runners do), the CPU plugin executes exactly these types: the bf16
MatMuls on the CPU's bf16 instructions, the rest in f32. On a CPU without bf16 the plugin runs the bf16
MatMuls in f32 (docs/precision.md).

The matching nodes also carry OpenVINO's `DisablePrecisionConversion` mark, which the CPU plugin honours
when a caller compiles with its default (bf16 on CPUs that have it) inference precision: then the marked
nodes stay f32 while everything unmarked runs bf16. The mark is not copied to nodes the plugin's own passes
create, so the IR is written in forms those passes leave alone:

- the score MatMul has its transpose folded in (transpose_b), which the plugin would otherwise fuse;
- each Divide (the keys' normalisation, the merge's division by size) is written as
  `(x * sign(y)) * exp(-log(|y|))`: the plugin turns a Divide into Power(y, -1) and Multiply and fuses
  `x * Power(y, -1)` or a Negative back into new nodes, but keeps Abs, Sign, Log, Exp and Multiply;
- the f32 nodes that feed a marked node are marked too: the plugin fuses an elementwise node into the node
  before it (the merge's size weighting into the block's residual add), and the fused node runs in the
  first node's precision.

Python cannot create that mark on a node, so it is written into the IR's XML (`mark_precise`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

# The IR attribute that keeps a node in its original precision (OpenVINO's DisablePrecisionConversion
# from any type to f16/bf16; the CPU plugin checks the f16 entry for both).
PRECISE_ATTRIBUTE = {"name": "DisablePrecisionConversion", "version": "0", "value": "dynamic:f16"}


def _is_last_two_swap(node: Any) -> bool:
    """A Transpose whose constant order swaps the last two axes only."""
    if node.get_type_name() != "Transpose":
        return False
    order_node = node.input_value(1).get_node()
    if order_node.get_type_name() != "Constant":
        return False
    order = [int(v) for v in order_node.get_vector()]
    rank = len(order)
    return rank >= 2 and order == [*range(rank - 2), rank - 1, rank - 2]


def fold_transposed_operand(matmul: Any) -> Any:
    """A MatMul whose second input is a last-two-axes Transpose -> the same product with transpose_b
    flipped and the Transpose dropped (the node the CPU plugin would make, made here so a mark stays on it)."""
    from openvino import opset13 as ops

    transpose = matmul.input_value(1).get_node()
    if not _is_last_two_swap(transpose):
        return matmul
    attributes = matmul.get_attributes()
    folded = ops.matmul(
        matmul.input_value(0), transpose.input_value(0), attributes["transpose_a"], not attributes["transpose_b"]
    )
    folded.set_friendly_name(matmul.get_friendly_name())
    matmul.output(0).replace(folded.output(0))
    return folded


def to_bf16_compute(matmul: Any) -> None:
    """f32 MatMul -> Convert(bf16) on both inputs, the MatMul in bf16, Convert back to f32, in place."""
    from openvino import opset13 as ops

    attributes = matmul.get_attributes()
    inputs = [ops.convert(matmul.input_value(i), "bf16") for i in range(2)]
    product = ops.matmul(inputs[0], inputs[1], attributes["transpose_a"], attributes["transpose_b"])
    product.set_friendly_name(matmul.get_friendly_name())
    matmul.output(0).replace(ops.convert(product, "f32").output(0))


def divide_as_reciprocal(divide: Any) -> set[str]:
    """An f32 Divide x / y -> (x * sign(y)) * exp(-log(|y|)), in place (the Multiply keeps the Divide's name):
    the same quotient in f32 to a few ulp for every nonzero y, written in ops the CPU plugin keeps as they
    are. Returns the names of the nodes it made."""
    import numpy as np
    from openvino import opset13 as ops

    name = divide.get_friendly_name()
    numerator, denominator = divide.input_value(0), divide.input_value(1)
    steps = {
        "abs": ops.abs(denominator),
        "sign": ops.sign(denominator),
    }
    steps["log"] = ops.log(steps["abs"])
    steps["negated_log"] = ops.multiply(steps["log"], ops.constant(np.float32(-1.0)))
    steps["reciprocal"] = ops.exp(steps["negated_log"])
    steps["signed"] = ops.multiply(numerator, steps["sign"])
    for step, node in steps.items():
        node.set_friendly_name(f"{name}/{step}")
    quotient = ops.multiply(steps["signed"], steps["reciprocal"])
    quotient.set_friendly_name(name)
    divide.output(0).replace(quotient.output(0))
    return {node.get_friendly_name() for node in steps.values()}


def f32_producers(model: Any, names: set[str]) -> set[str]:
    """The names of the computed (not Parameter or Constant) f32 outputs' nodes that feed a node in `names`."""
    import openvino as ov

    producers = set()
    for node in model.get_ordered_ops():
        if node.get_friendly_name() not in names:
            continue
        for value in node.input_values():
            producer = value.get_node()
            if value.get_element_type() == ov.Type.f32 and producer.get_type_name() not in ("Parameter", "Constant"):
                producers.add(producer.get_friendly_name())
    return producers


def keep_matching_f32(model: Any, matching: set[str]) -> set[str]:
    """Rewrite the f32 matching nodes of an OpenVINO model in place into forms the CPU plugin keeps (each
    score MatMul with its transposed operand folded, each Divide as a reciprocal product). Returns the names
    to mark precise: `matching` (rewritten nodes keep their names), the nodes the rewrite made, and the f32
    nodes that feed any of them."""
    import openvino as ov

    precise = set(matching)
    for node in list(model.get_ordered_ops()):
        if node.get_friendly_name() not in matching or node.get_output_element_type(0) != ov.Type.f32:
            continue
        if node.get_type_name() == "MatMul":
            fold_transposed_operand(node)
        elif node.get_type_name() == "Divide":
            precise |= divide_as_reciprocal(node)
    model.validate_nodes_and_infer_types()
    return precise | f32_producers(model, precise)


def bf16_model(model: Any, matching: set[str]) -> set[str]:
    """Rewrite an OpenVINO model (from a tome-deploy ONNX file) in place: every f32 MatMul not in
    `matching` computes in bf16, and the matching nodes are written as `keep_matching_f32` writes them.
    Returns the names to mark precise (`keep_matching_f32`'s)."""
    import openvino as ov

    for node in list(model.get_ordered_ops()):
        is_f32_matmul = node.get_type_name() == "MatMul" and node.get_output_element_type(0) == ov.Type.f32
        if is_f32_matmul and node.get_friendly_name() not in matching:
            to_bf16_compute(node)
    return keep_matching_f32(model, matching)


def mark_precise(xml_path: Path, names: set[str]) -> int:
    """Add PRECISE_ATTRIBUTE to the rt_info of every layer of the IR at `xml_path` named in `names`,
    rewriting the file in place; returns how many layers were marked."""
    tree = ElementTree.parse(xml_path)
    marked = 0
    for layer in tree.getroot().iter("layer"):
        if layer.get("name") not in names:
            continue
        rt_info = layer.find("rt_info")
        if rt_info is None:
            rt_info = ElementTree.SubElement(layer, "rt_info")
        ElementTree.SubElement(rt_info, "attribute", PRECISE_ATTRIBUTE)
        marked += 1
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)
    return marked


def runtime_layers(compiled: Any) -> list[tuple[str, str, list[str]]]:
    """(layer type, runtime precision, the original node names) of every layer of a compiled model."""
    layers = []
    for layer in compiled.get_runtime_model().get_ops():
        info = layer.get_rt_info()
        originals = [name for name in info["originalLayersNames"].astype(str).split(",") if name]
        layers.append((info["layerType"].astype(str), info["runtimePrecision"].astype(str), originals))
    return layers
