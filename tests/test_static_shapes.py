"""Every tensor of an export has a static shape except the batch: ONNX's own shape inference, run on the
written file, finds a concrete size or the batch symbol for every dimension of every node output."""

from __future__ import annotations

import onnx
import pytest
from conftest import FAMILIES

from tome_deploy.artifact.spec import EXPORT_SPEC, MERGE_FORMULATIONS
from tome_deploy.token_merge import contract


def unknown_dims(path) -> list[str]:
    """'tensor (op): dims' for every node output whose inferred shape is missing or has a non-batch unknown."""
    contract.register_onnx_schema()  # --merge plugin graphs hold tome::TokenMerge nodes
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    graph = model.graph
    shapes = {v.name: v.type.tensor_type for v in [*graph.input, *graph.output, *graph.value_info]}
    offenders = []
    for node in graph.node:
        for name in filter(None, node.output):
            tensor = shapes.get(name)
            if tensor is None or not tensor.HasField("shape"):
                offenders.append(f"{name} ({node.op_type}): no shape")
                continue
            dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim]
            if any(isinstance(d, str) and d != EXPORT_SPEC.batch_axis_name for d in dims):
                offenders.append(f"{name} ({node.op_type}): {dims}")
    return offenders


@pytest.mark.parametrize("merge", MERGE_FORMULATIONS)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_tensor_is_static_but_the_batch(export_cached, family, merge):
    exported = export_cached(family, merge)
    offenders = unknown_dims(exported.path)
    assert not offenders, f"{len(offenders)} tensors with unknown dims, e.g. {offenders[:5]}"
    batch_dims = [d.dim_param for d in onnx.load(str(exported.path)).graph.input[0].type.tensor_type.shape.dim]
    assert batch_dims[0] == EXPORT_SPEC.batch_axis_name  # the batch stays dynamic


def test_the_check_sees_unknown_dims(tmp_path):
    """A Reshape to a computed shape (what the exporter's SDPA decomposition wrote) is reported."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [EXPORT_SPEC.batch_axis_name, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    path = tmp_path / "reshape.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    assert unknown_dims(path) and unknown_dims(path)[0].startswith("y (Reshape)")
