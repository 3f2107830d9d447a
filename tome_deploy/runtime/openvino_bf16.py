"""bf16 for OpenVINO with fp32 matching: the precision is written into the IR's element types.

Every MatMul of the transformer (attention projections, the MLP, and the attention's two products) gets
its inputs converted to bf16 and its result converted back to f32; every other node (the matching
subgraph, log(size), norms, softmax, GELU and the residual stream) computes in f32. Run with OpenVINO's
inference precision f32 (what the runners do), the CPU plugin executes exactly these types: the bf16
MatMuls on the CPU's bf16 instructions, the rest in f32. On a CPU without bf16 the plugin runs the bf16
MatMuls in f32 (docs/precision.md).

The matching nodes also carry OpenVINO's `DisablePrecisionConversion` mark, which the CPU plugin honours
when a caller compiles with its default (bf16 on CPUs that have it) inference precision: then the
matching nodes that reach the plugin's graph unchanged stay f32 while everything unmarked runs bf16.
The mark is not copied to nodes the plugin's own passes create (it rewrites Divide into Power and
Multiply, and fuses the MatMul's transposed input), so the score MatMul is written with its transpose
folded in (transpose_b), leaving the plugin nothing to rewrite there. Python cannot create that mark on
a node, so it is written into the IR's XML (`mark_precise`).
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


def bf16_model(model: Any, matching: set[str]) -> set[str]:
    """Rewrite an OpenVINO model (from a tome-deploy ONNX file) in place: every f32 MatMul not in
    `matching` computes in bf16, and every MatMul in it has its transposed operand folded.
    Returns the names to mark precise: `matching` (folded MatMuls keep their names)."""
    import openvino as ov

    for node in list(model.get_ordered_ops()):
        if node.get_type_name() != "MatMul" or node.get_output_element_type(0) != ov.Type.f32:
            continue
        if node.get_friendly_name() in matching:
            fold_transposed_operand(node)
        else:
            to_bf16_compute(node)
    model.validate_nodes_and_infer_types()
    return set(matching)


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
