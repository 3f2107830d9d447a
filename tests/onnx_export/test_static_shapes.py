"""Every tensor of an export has a static shape except the batch: ONNX's own shape inference, run on the
written file, finds a concrete size or the batch symbol for every dimension of every node output."""

from __future__ import annotations

import onnx
import pytest
import timm
import torch
from conftest import FAMILIES

from tome_deploy.artifact.formulations import formulation_names
from tome_deploy.artifact.spec import EXPORT_SPEC
from tome_deploy.models.patch import apply_tome
from tome_deploy.onnx_export.export import export_onnx
from tome_deploy.onnx_export.metadata import build_metadata
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


def assert_static_but_the_batch(path) -> None:
    offenders = unknown_dims(path)
    assert not offenders, f"{len(offenders)} tensors with unknown dims, e.g. {offenders[:5]}"
    batch_dims = [d.dim_param for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert batch_dims[0] == EXPORT_SPEC.batch_axis_name  # the batch stays dynamic


@pytest.mark.parametrize("merge", formulation_names())
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_tensor_is_static_but_the_batch(export_cached, family, merge):
    """The timm VisionTransformer variants of tests/conftest.py (shared with the other export tests)."""
    assert_static_but_the_batch(export_cached(family, merge).path)


# The other families, as tiny random models (2 blocks: the second one takes merged tokens and proportional
# attention; the sizes of tests/models/test_model_families.py). Random init is enough: shapes do not depend on
# the weights. family -> (factory, r)
def _hf(name: str, config_name: str, **extra):
    def make():
        import transformers

        from tome_deploy.models.hf_transformers import HFImageModel

        config = getattr(transformers, config_name)(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4, **extra
        )
        return HFImageModel(getattr(transformers, name)(config))

    return make


def _open_clip():
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=4, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=16)


def _torchvision_vit():
    import torchvision

    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


OTHER_FAMILIES = {
    "timm_eva": (
        lambda: timm.create_model("eva02_tiny_patch14_224", img_size=56, depth=2, num_classes=7),
        4,
    ),  # 17 tokens
    "hf_vit": (_hf("ViTForImageClassification", "ViTConfig", intermediate_size=64, num_labels=10), 8),
    "hf_deit_with_teacher": (
        _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", intermediate_size=64, num_labels=5),
        8,
    ),
    "hf_clip_vision_with_projection": (
        _hf("CLIPVisionModelWithProjection", "CLIPVisionConfig", intermediate_size=64, projection_dim=8),
        8,
    ),
    "hf_siglip_vision": (_hf("SiglipVisionModel", "SiglipVisionConfig", intermediate_size=64), 8),
    "hf_dinov2_with_registers": (
        _hf("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig", mlp_ratio=2, num_register_tokens=2),
        8,
    ),
    "open_clip": (_open_clip, 8),
    "torchvision_vit": (_torchvision_vit, 8),
}


@pytest.mark.slow
@pytest.mark.parametrize("merge", formulation_names())
@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_are_static_but_the_batch(tmp_path, family, merge):
    factory, r = OTHER_FAMILIES[family]
    torch.manual_seed(0)
    tome, schedule = apply_tome(factory().eval(), r, merge)
    assert schedule.tokens[-1] < schedule.tokens[1] < schedule.tokens[0]  # both blocks merge
    metadata = build_metadata(
        tome,
        schedule,
        r,
        arch=family,
        weights="random init (test)",
        weights_sha256="test",
        merge=merge,
        opset=18,
        batch=None,
        example_batch=2,
    )
    assert_static_but_the_batch(export_onnx(tome, metadata, tmp_path / f"{family}_{merge}.onnx").path)


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
