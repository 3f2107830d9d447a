"""ToMe for the families beyond timm's VisionTransformer: timm Eva (RoPE), Hugging Face transformers and
OpenCLIP image towers. Tiny random models; every r>0 check compares with tests/reference_families.py (a
plain float64 reference that does not import tome_deploy), and the cross-family checks compare with timm
VisionTransformer copies of the same weights."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from conftest import io_symbolic_dims
from family_sources import TINY_HF_VIT
from reference_families import (
    reference_eva,
    reference_hf_clip,
    reference_hf_deit_teacher,
    reference_hf_dinov2,
    reference_hf_siglip,
    reference_hf_vit,
    reference_open_clip,
)
from torch import nn

from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.errors import UnsupportedModelError
from tome_deploy.models.patch import apply_tome, track_sources
from tome_deploy.onnx_export.export import export_onnx
from tome_deploy.onnx_export.metadata import build_metadata
from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner
from tome_deploy.token_merge import contract
from tome_deploy.validation.parity import validate_onnx

transformers = pytest.importorskip("transformers")
open_clip = pytest.importorskip("open_clip")


def _randomise_norms(model: nn.Module) -> nn.Module:
    """LayerNorms start at (1, 0); random affine parameters make the checks sensitive to them."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            module.weight.data = 0.5 + torch.rand_like(module.weight)
            module.bias.data = 0.1 * torch.randn_like(module.bias)
    return model.eval()


def make_eva() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("eva02_tiny_patch14_224", img_size=84, depth=3, num_classes=7)  # 36 patches + cls
    for block in model.blocks:
        block.attn.q_bias.data.normal_(0, 0.1)
        block.attn.v_bias.data.normal_(0, 0.1)
    model.head.weight.data.normal_(0, 1.0)  # timm's head starts near zero: logits of order 1 make the checks bite
    return _randomise_norms(model)


def make_hf_vit():
    from tome_deploy.models.hf_transformers import HFImageModel

    torch.manual_seed(0)
    config = transformers.ViTConfig(**TINY_HF_VIT)
    return HFImageModel(_randomise_norms(transformers.ViTForImageClassification(config))).eval()


def make_open_clip() -> nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=32, patch_size=4, width=64, layers=3, heads=2, mlp_ratio=4.0, output_dim=16)
    return _randomise_norms(visual)


def _randomise_embeddings(model: nn.Module) -> nn.Module:
    """transformers starts DeiT's class / distillation tokens and position embeddings and DINOv2's registers
    at zero and LayerScale at a constant: random values make every prefix token distinct (mixing two up
    shows) and the checks sensitive to the layer scales; heads of order 1 make the logits checks bite."""
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("cls_token", "distillation_token", "register_tokens", "position_embeddings"):
            param.data.normal_(0, 0.5)
        elif leaf == "lambda1":
            param.data = 0.1 + 0.5 * torch.rand_like(param)
    for head in ("cls_classifier", "distillation_classifier"):
        if hasattr(model, head):
            getattr(model, head).weight.data.normal_(0, 1.0)
    return model


# transformers class -> (its config class, arguments besides the common ones). initializer_range 0.2, ten times
# the default: at 0.02 the class token of DeiT and DINOv2 hardly depends on the merges (< 1e-3).
HF_CONFIGS = {
    "DeiTForImageClassificationWithTeacher": (
        "DeiTConfig",
        {"intermediate_size": 64, "num_labels": 5, "initializer_range": 0.2},
    ),
    "CLIPVisionModel": ("CLIPVisionConfig", {"intermediate_size": 64}),
    "CLIPVisionModelWithProjection": ("CLIPVisionConfig", {"intermediate_size": 64, "projection_dim": 8}),
    "SiglipVisionModel": ("SiglipVisionConfig", {"intermediate_size": 64}),
    "Dinov2Model": ("Dinov2Config", {"mlp_ratio": 2, "initializer_range": 0.2}),
    "Dinov2WithRegistersModel": (
        "Dinov2WithRegistersConfig",
        {"mlp_ratio": 2, "num_register_tokens": 2, "initializer_range": 0.2},
    ),
}


def make_hf(name: str) -> nn.Module:
    """A tiny random transformers model of class `name`: 2 layers, width 32, 8 x 8 patches of 4 pixels."""
    from tome_deploy.models.hf_transformers import HFImageModel

    config_class, arguments = HF_CONFIGS[name]
    config = getattr(transformers, config_class)(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=4, **arguments
    )
    torch.manual_seed(0)
    return HFImageModel(_randomise_norms(_randomise_embeddings(getattr(transformers, name)(config)))).eval()


# family -> (transformers class, reference, prefix tokens: class, distillation, registers)
HF_CLASSES = {
    "hf_deit_teacher": ("DeiTForImageClassificationWithTeacher", reference_hf_deit_teacher, 2),
    "hf_clip": ("CLIPVisionModel", reference_hf_clip, 1),
    "hf_clip_projection": ("CLIPVisionModelWithProjection", reference_hf_clip, 1),
    "hf_siglip": ("SiglipVisionModel", reference_hf_siglip, 0),
    "hf_dinov2": ("Dinov2Model", reference_hf_dinov2, 1),
    "hf_dinov2_registers": ("Dinov2WithRegistersModel", reference_hf_dinov2, 3),
}


def _on_hf(reference):
    """A transformers reference takes the HF model inside HFImageModel."""
    return lambda model, x, r: reference(model.hf, x, r)


# family -> (model factory, reference, input size, r)
FAMILIES = {
    "timm_eva": (make_eva, reference_eva, 84, 6),
    "hf_vit": (make_hf_vit, _on_hf(reference_hf_vit), 32, 8),
    "open_clip": (make_open_clip, reference_open_clip, 32, 8),
    **{
        family: (functools.partial(make_hf, name), _on_hf(reference), 32, 12)
        for family, (name, reference, _) in HF_CLASSES.items()
    },
}


@functools.cache
def family_model(family: str) -> nn.Module:
    return FAMILIES[family][0]()


def pixels(family: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = FAMILIES[family][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_r0_equals_the_unpatched_model(family):
    model = family_model(family)
    tome, schedule = apply_tome(model, 0)
    x = pixels(family)
    with torch.inference_mode():
        expected, got = model(x), tome(x)
    assert schedule.effective == (0,) * schedule.depth
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tome_equals_the_plain_reference(family):
    model = family_model(family)
    _, reference, _, r = FAMILIES[family]
    x = pixels(family)
    tome, schedule = apply_tome(model, r)
    assert schedule.tokens[-1] < schedule.tokens[0]  # it really merges
    with torch.inference_mode():
        got = tome(x)
    expected = reference(model, x, list(schedule.effective))
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4, (got - expected).abs().max()
    with torch.inference_mode():
        unmerged = model(x)
    assert (unmerged - expected).abs().max() > 1e-3  # the reference is not just the plain model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scatter_and_matmul_agree(family):
    model = family_model(family)
    r = FAMILIES[family][3]
    x = pixels(family)
    with torch.inference_mode():
        scatter, matmul = (apply_tome(model, r, f)[0](x) for f in ("scatter", "matmul"))
    assert (scatter - matmul).abs().max() <= 1e-5


def _export(family: str, merge: str, folder: Path) -> tuple[nn.Module, ToMeMetadata, Path]:
    """The family's ToMe model (its r, dynamic batch traced at 2) exported with `merge`."""
    r = FAMILIES[family][3]
    tome, schedule = apply_tome(family_model(family), r, merge)
    metadata = build_metadata(
        tome,
        schedule,
        r,
        arch=family,
        weights="random (test)",
        weights_sha256="test",
        merge=merge,
        opset=18,
        batch=None,
        example_batch=2,
    )
    return tome, metadata, export_onnx(tome, metadata, folder / f"{family}_{merge}.onnx").path


@pytest.fixture(scope="module")
def export_family(tmp_path_factory):
    """(family, merge) -> (tome, metadata, path); exports take seconds, so each is made once per module."""
    cache: dict[tuple[str, str], tuple[nn.Module, ToMeMetadata, Path]] = {}

    def get(family: str, merge: str) -> tuple[nn.Module, ToMeMetadata, Path]:
        if (family, merge) not in cache:
            cache[family, merge] = _export(family, merge, tmp_path_factory.mktemp(family))
        return cache[family, merge]

    return get


# Exported: every family but CLIPVisionModel and Dinov2Model, whose graphs are those of the WithProjection /
# WithRegisters classes less the projection / the registers (their eager r>0 references run above).
EXPORTED_FAMILIES = sorted(set(FAMILIES) - {"hf_clip", "hf_dinov2"})


@pytest.fixture(scope="module", params=EXPORTED_FAMILIES)
def exported(request, export_family):
    # matmul: the formulation every runtime takes (TensorRT too); scatter = matmul is checked above, and
    # the CLI test below exports with scatter
    return (request.param, *export_family(request.param, "matmul"))


def test_onnx_runtime_matches_pytorch_at_other_batch_sizes(exported):
    family, tome, metadata, path = exported
    report = validate_onnx(tome, path, metadata, batch_sizes=[1, 3])  # traced at 2; random, constant, natural images
    assert report.passed, report.table()
    x = pixels(family, batch=3, seed=5)
    with OnnxRuntimeRunner(path) as runner:
        got = runner.infer({metadata.input.name: x.numpy()})[metadata.output_name]
    with torch.inference_mode():
        expected = tome(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4


def test_only_the_batch_dimension_is_symbolic(exported):
    _, _, metadata, path = exported
    graph = onnx.load(str(path)).graph
    assert io_symbolic_dims(graph) == {"batch"}
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == list(metadata.input.shape)


def test_matching_and_merging_nodes_carry_the_merger_scope(exported):
    """The benchmark's merge share counts the nodes under a TokenMerger scope: every family must have them."""
    from tome_deploy.runtime.profiling import merger_node_names

    _, _, _, path = exported
    names = merger_node_names(path)
    in_scope = {node.op_type for node in onnx.load(str(path)).graph.node if node.name in names}
    # the keys' mean over heads (the metric), best match, score order, kept tokens, scores and one-hot sums
    assert {"ReduceMean", "ArgMax", "TopK", "GatherND", "MatMul"} <= in_scope


# --merge plugin: one fused tome::TokenMerge node per merging block, run by ONNX Runtime through
# onnxruntime-extensions; one transformers class beyond ViT (registers and LayerScale) stands for the rest
PLUGIN_FAMILIES = ("timm_eva", "hf_vit", "open_clip", "hf_dinov2_registers")


@pytest.mark.parametrize("family", PLUGIN_FAMILIES)
def test_plugin_export_equals_scatter_and_the_matmul_export(family, export_family):
    """The plugin export in ONNX Runtime against the scatter formulation in PyTorch and against the matmul
    export in ONNX Runtime (the one the tests above check; a scatter export would be one more export each)."""
    _, metadata, path = export_family(family, "plugin")
    _, _, matmul_path = export_family(family, "matmul")
    merges = [n for n in onnx.load(str(path)).graph.node if n.op_type == contract.OP_TYPE]
    assert len(merges) == sum(r > 0 for r in metadata.r_effective) > 0
    x = pixels(family, batch=3, seed=5)  # traced at 2
    with OnnxRuntimeRunner(path) as plugin_runner, OnnxRuntimeRunner(matmul_path) as matmul_runner:
        plugin, matmul = (
            runner.infer({metadata.input.name: x.numpy()})[metadata.output_name]
            for runner in (plugin_runner, matmul_runner)
        )
    np.testing.assert_allclose(plugin, matmul, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():
        scatter = apply_tome(family_model(family), FAMILIES[family][3], "scatter")[0](x).numpy()
    assert np.abs(plugin - scatter).max() <= 1e-4


def test_metadata_counts_the_real_mlp_width_and_prefix():
    eva = family_model("timm_eva")
    tome, schedule = apply_tome(eva, 6)
    meta = build_metadata(
        tome,
        schedule,
        6,
        arch="eva",
        weights="-",
        weights_sha256="-",
        merge="scatter",
        opset=18,
        batch=None,
        example_batch=2,
    )
    mlp = eva.blocks[0].mlp  # SwiGLU: fc1 is C -> 2H (gate and value), fc2 H -> C
    width = mlp.fc2.in_features
    assert meta.num_prefix_tokens == 1 and meta.tokens_per_layer[0] == 37
    tokens, dim = meta.tokens_per_layer, eva.embed_dim
    flops = lambda t: sum(8 * t[i] * dim**2 + 4 * t[i] ** 2 * dim + 2 * 3 * width * dim * t[i + 1] for i in range(3))  # noqa: E731
    assert meta.theoretical_speedup == pytest.approx(flops([37] * 4) / flops(tokens), abs=1e-4)


def test_source_tracking_covers_every_patch_once():
    for family in sorted(FAMILIES):
        tome, schedule = apply_tome(family_model(family), FAMILIES[family][3])
        source, size = track_sources(tome, pixels(family, batch=1))
        p = schedule.num_prefix
        assert source.shape[1] == schedule.tokens[-1]
        assert torch.equal(source[0, :, p:].sum(dim=0), torch.ones(source.shape[2] - p))
        assert torch.allclose(size[0, :, 0], source[0].sum(dim=1))


# ---------------------------------------------------------------------------------------------------------
# Cross-family: the same network in timm gives the same ToMe outputs and merge choices


def _same_tome(a: nn.Module, b: nn.Module, x: torch.Tensor, r: int) -> None:
    tome_a, _ = apply_tome(a, r)
    tome_b, _ = apply_tome(b, r)
    with torch.inference_mode():
        assert (tome_a(x) - tome_b(x)).abs().max() <= 1e-4
        assert torch.equal(track_sources(tome_a, x)[0], track_sources(tome_b, x)[0])  # same merges


def test_hf_vit_and_its_timm_copy_merge_alike():
    from timm.models.vision_transformer import VisionTransformer

    hf = family_model("hf_vit")
    config = hf.hf.config
    timm_vit = VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=32,
        depth=3,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=10,
        norm_layer=functools.partial(nn.LayerNorm, eps=config.layer_norm_eps),
    )
    sd = {k: v for k, v in hf.hf.state_dict().items()}
    mapped = {
        "cls_token": sd["vit.embeddings.cls_token"],
        "pos_embed": sd["vit.embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["vit.embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["vit.embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["vit.layernorm.weight"],
        "norm.bias": sd["vit.layernorm.bias"],
        "head.weight": sd["classifier.weight"],
        "head.bias": sd["classifier.bias"],
    }
    for i in range(3):
        src, dst = f"vit.layers.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            mapped[dst + f"attn.qkv.{kind}"] = torch.cat([sd[src + f"attention.{p}_proj.{kind}"] for p in "qkv"])
            for a, b in (
                ("norm1", "layernorm_before"),
                ("norm2", "layernorm_after"),
                ("attn.proj", "attention.o_proj"),
                ("mlp.fc1", "mlp.fc1"),
                ("mlp.fc2", "mlp.fc2"),
            ):
                mapped[dst + f"{a}.{kind}"] = sd[src + f"{b}.{kind}"]
    timm_vit.load_state_dict(mapped)
    _same_tome(hf, timm_vit.eval(), pixels("hf_vit"), 8)


def test_open_clip_and_its_timm_copy_merge_alike():
    from timm.models.vision_transformer import VisionTransformer, _convert_openai_clip

    visual = family_model("open_clip")
    timm_vit = VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=3,
        num_heads=2,
        pre_norm=True,
        num_classes=16,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-5),
    )
    state = {f"visual.{k}": v for k, v in visual.state_dict().items()}
    timm_vit.load_state_dict(_convert_openai_clip(state, timm_vit))
    _same_tome(visual, timm_vit.eval(), pixels("open_clip"), 8)


# ---------------------------------------------------------------------------------------------------------
# Refusals: one line naming the class and why


def test_unsupported_classes_are_refused_in_one_line():
    from tome_deploy.models.hf_transformers import HFImageModel

    with pytest.raises(UnsupportedModelError, match="SwinModel is not a transformers class ToMe supports") as err:
        HFImageModel(
            transformers.SwinModel(transformers.SwinConfig(embed_dim=16, depths=[1], num_heads=[1], image_size=32))
        )
    assert "\n" not in str(err.value)
    rope_vit = timm.create_model("vit_small_patch16_rope_224", img_size=32, depth=1)
    with pytest.raises(UnsupportedModelError, match="AttentionRope") as err:
        apply_tome(rope_vit, 2)
    assert "\n" not in str(err.value)
    with pytest.raises(UnsupportedModelError, match="BasicBlock|ResNet") as err:
        apply_tome(timm.create_model("resnet10t"), 2)


# ---------------------------------------------------------------------------------------------------------
# The other transformers classes: the class, distillation and register tokens are never merged


@pytest.mark.parametrize("family", sorted(HF_CLASSES))
def test_prefix_tokens_of_the_transformers_classes_are_never_merged(family):
    prefix = HF_CLASSES[family][2]
    tome, schedule = apply_tome(family_model(family), FAMILIES[family][3])
    assert schedule.num_prefix == prefix and schedule.tokens == (64 + prefix, 52 + prefix, 40 + prefix)
    source, _ = track_sources(tome, pixels(family, batch=1))
    assert torch.equal(source[0, :prefix, :prefix], torch.eye(prefix))  # each prefix token holds itself only
    assert source[0, :prefix].sum() == prefix  # and no patch was merged into one


# ---------------------------------------------------------------------------------------------------------
# The commands on a Hugging Face folder: export, validate (parity table), visualize


def test_cli_export_validate_visualize_a_save_pretrained_folder(tmp_path, capsys):
    from PIL import Image

    from tome_deploy.cli import export as export_cli
    from tome_deploy.cli import validate as validate_cli
    from tome_deploy.cli import visualize as visualize_cli

    folder = tmp_path / "hf_vit"
    family_model("hf_vit").hf.save_pretrained(folder)
    onnx_path = tmp_path / "x.onnx"
    assert export_cli.main([str(folder), "--r", "8", "-o", str(onnx_path), "--no-validate", "--quiet"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert meta["tome.model"] == '"ViTForImageClassification"' and json.loads(meta["tome.input"])["shape"] == [
        3,
        32,
        32,
    ]
    capsys.readouterr()
    assert validate_cli.main([str(folder), str(onnx_path)]) == 0
    err = capsys.readouterr().err
    assert "FAIL" not in err and "PASS" in err and "constant" in err
    image = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "merges.png"
    assert visualize_cli.main([str(folder), str(image), "--r", "8", "-o", str(out)]) == 0
    assert Image.open(out).size[0] > 0 and "patches ->" in capsys.readouterr().err


def test_open_clip_checkpoint_loads_the_given_weights(tmp_path):
    from safetensors.torch import save_file

    from tome_deploy.models.loading.dispatch import load_model
    from tome_deploy.models.loading.fingerprint import weights_fingerprint

    seeded = load_model("open_clip:ViT-B-32", seed=3)
    assert seeded.random_weights and seeded.model.output_dim == 512
    path = tmp_path / "clip.safetensors"
    save_file({f"visual.{k}": v.contiguous() for k, v in seeded.model.state_dict().items()}, str(path))
    loaded = load_model("open_clip:ViT-B-32", checkpoint=str(path))  # seed 0 init, then the file's weights
    assert not loaded.random_weights and "clip.safetensors" in loaded.weights
    assert weights_fingerprint(loaded.model) == weights_fingerprint(seeded.model)
    assert weights_fingerprint(load_model("open_clip:ViT-B-32").model) != weights_fingerprint(seeded.model)


def test_serving_and_triton_repository_take_every_family(exported, tmp_path):
    from tome_deploy.runtime.factory import open_runner
    from tome_deploy.serving.served_model import read_served_model, run_padded
    from tome_deploy.serving.triton_repo import TritonOptions, write_triton_repo

    family, tome, metadata, path = exported
    served_model = read_served_model(path)
    x = pixels(family, batch=2, seed=7)
    with open_runner(served_model.path) as runner:
        served = run_padded(runner, served_model, {served_model.model_input.name: x.numpy()})[metadata.output_name]
    with torch.inference_mode():
        assert np.abs(served - tome(x).numpy()).max() <= 1e-4
    repo = write_triton_repo(served_model, tmp_path / "repo", TritonOptions(model_name=family))
    config = repo.config_path.read_text()
    assert "onnxruntime_onnx" in config and str(served_model.num_classes) in config and repo.model_path.is_file()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_target_speedup_plans_for_every_family(family):
    from tome_deploy.core.speedup import speedup_choice
    from tome_deploy.models.adapter import adapter_for, describe

    model = family_model(family)
    choice = speedup_choice(describe(adapter_for(model), model), 1.3)
    tome, schedule = apply_tome(model, choice.r)
    meta = build_metadata(
        tome,
        schedule,
        choice.r,
        arch=family,
        weights="-",
        weights_sha256="-",
        merge="scatter",
        opset=18,
        batch=None,
        example_batch=2,
    )
    assert meta.theoretical_speedup >= 1.3 and meta.theoretical_speedup == pytest.approx(choice.predicted, abs=1e-4)
    if choice.r > 1:  # the smallest such r: one less falls short
        smaller, smaller_schedule = apply_tome(model, choice.r - 1)
        assert (
            build_metadata(
                smaller,
                smaller_schedule,
                choice.r - 1,
                arch=family,
                weights="-",
                weights_sha256="-",
                merge="scatter",
                opset=18,
                batch=None,
                example_batch=2,
            ).theoretical_speedup
            < 1.3
        )


# One model per family (and SigLIP's pooling head) is built: the other transformers classes add no new layer kind.
@pytest.mark.tensorrt
@pytest.mark.parametrize("family", ["hf_siglip", "hf_vit", "open_clip", "timm_eva"])
def test_tensorrt_rtx_builds_every_family_ahead_of_time(family, export_family, capsys):
    from conftest import build_rtx_engine

    _, metadata, path = export_family(family, "matmul")
    plan = path.with_suffix(".plan")
    sidecar = build_rtx_engine(path, plan, capsys)
    assert sidecar.tome.r_effective == metadata.r_effective and sidecar.input_shape == list(metadata.input.shape)
    assert plan.stat().st_size > 100_000
