"""ToMe for torchvision's VisionTransformer (models/torchvision_vit.py): a tiny model built directly, checked
against the unpatched model (r=0), an independent float64 reference (r>0, tests/reference_families.py), the
other merge formulation; the `torchvision:<builder>` source form through tome-export, and its refusals; the
scatter, matmul and plugin exports in ONNX Runtime, OpenVINO, a TensorRT-RTX build, tome-serve and triton-repo."""

from __future__ import annotations

import functools
import json

import numpy as np
import onnx
import pytest
import torch
import torchvision
from conftest import assert_one_line_error, io_symbolic_dims
from reference_families import reference_torchvision
from torch import nn

from tome_deploy.errors import UnsupportedModelError
from tome_deploy.models.adapter import adapter_for, describe
from tome_deploy.models.patch import apply_tome, track_sources
from tome_deploy.models.torchvision_vit import ADAPTER
from tome_deploy.onnx_export.export import export_onnx
from tome_deploy.onnx_export.metadata import build_metadata
from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner
from tome_deploy.validation.parity import validate_onnx

R = 8  # 65 tokens -> 57 -> 49 -> 41 over the 3 blocks


def _randomise(model: nn.Module) -> nn.Module:
    """LayerNorms start at (1, 0) and torchvision zeroes the head and the class token: random values make
    the checks sensitive to every one of them."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            module.weight.data = 0.5 + torch.rand_like(module.weight)
            module.bias.data = 0.1 * torch.randn_like(module.bias)
    model.class_token.data.normal_(0, 0.5)
    for head in model.heads.modules():
        if isinstance(head, nn.Linear):
            head.weight.data.normal_(0, 1.0)
            head.bias.data.normal_(0, 0.1)
    return model.eval()


def make_tiny(**options) -> nn.Module:
    """3 blocks, width 32, 2 heads, 8 x 8 patches of 4 px and the class token, 10 classes."""
    torch.manual_seed(0)
    arguments = dict(image_size=32, patch_size=4, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10)
    return _randomise(torchvision.models.VisionTransformer(**{**arguments, **options}))


def _conv_stem() -> nn.Module:
    from torchvision.models.vision_transformer import ConvStemConfig

    return make_tiny(conv_stem_configs=[ConvStemConfig(8, 3, 2), ConvStemConfig(16, 3, 2)])  # stride 4 = the patch


VARIANTS = {
    "plain": make_tiny,
    "representation": functools.partial(make_tiny, representation_size=16),  # pre_logits + tanh before the head
    "conv_stem": _conv_stem,
}


@functools.cache
def model_of(variant: str) -> nn.Module:
    return VARIANTS[variant]()


def pixels(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_r0_equals_the_unpatched_model(variant):
    model = model_of(variant)
    tome, schedule = apply_tome(model, 0)
    x = pixels()
    with torch.inference_mode():
        expected, got = model(x), tome(x)
    assert schedule.effective == (0, 0, 0)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_tome_equals_the_plain_reference(variant):
    model = model_of(variant)
    x = pixels()
    tome, schedule = apply_tome(model, R)
    assert schedule.tokens == (65, 57, 49, 41)
    with torch.inference_mode():
        got, unmerged = tome(x), model(x)
    expected = reference_torchvision(model, x, list(schedule.effective))
    assert got.shape == expected.shape == (2, 10)
    assert (got - expected).abs().max() <= 1e-4, (got - expected).abs().max()
    assert (unmerged - expected).abs().max() > 1e-3  # the reference is not just the plain model


def test_scatter_and_matmul_agree():
    model, x = model_of("plain"), pixels()
    with torch.inference_mode():
        scatter, matmul = (apply_tome(model, R, f)[0](x) for f in ("scatter", "matmul"))
    assert (scatter - matmul).abs().max() <= 1e-5


def test_the_class_token_is_never_merged_and_every_patch_is_covered_once():
    tome, schedule = apply_tome(model_of("plain"), R)
    source, size = track_sources(tome, pixels(batch=1))
    assert schedule.num_prefix == 1 and source.shape[1] == 41
    assert source[0, 0, 0] == 1 and source[0, 0].sum() == 1  # the class token holds itself only
    assert torch.equal(source[0, :, 1:].sum(dim=0), torch.ones(64))
    assert torch.allclose(size[0, :, 0], source[0].sum(dim=1))


def test_shape_preprocessing_and_output_kind():
    model = model_of("plain")
    shape = describe(adapter_for(model), model)
    assert (shape.tokens, shape.depth, shape.num_prefix, shape.width, shape.mlp_ratio, shape.grid) == (
        65,
        3,
        1,
        32,
        2.0,
        (8, 8),
    )
    # no builder has this architecture: ImageNet statistics, bilinear, resized to the input
    spec = ADAPTER.input_spec(model)
    assert (spec.kind, spec.name, spec.shape) == ("image", "pixel_values", (3, 32, 32))
    assert spec.preprocessing == {
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    assert ADAPTER.output_kind(model) == "logits"
    headless = make_tiny()
    headless.heads = nn.Identity()
    assert ADAPTER.output_kind(headless) == "embedding"


@pytest.mark.parametrize(
    "builder, size, interpolation, crop_pct",
    [
        ("vit_b_16", 224, "bilinear", 224 / 256),  # IMAGENET1K_V1: resize 256, crop 224
        ("vit_b_16", 384, "bicubic", 1.0),  # IMAGENET1K_SWAG_E2E_V1
        ("vit_l_16", 512, "bicubic", 1.0),
        ("vit_h_14", 518, "bicubic", 1.0),
        ("vit_b_32", 64, "bilinear", 1.0),  # no weights at 64: the default
    ],
)
def test_preprocessing_comes_from_the_builders_weights_at_that_size(builder, size, interpolation, crop_pct):
    with torch.device("meta"):  # the architecture only: no memory, no weights, no download
        model = getattr(torchvision.models, builder)(image_size=size)
    spec = ADAPTER.input_spec(model)
    config = spec.preprocessing
    assert spec.shape == (3, size, size) and config["interpolation"] == interpolation
    assert config["crop_pct"] == pytest.approx(crop_pct) and config["mean"] == [0.485, 0.456, 0.406]


def test_unsupported_variants_are_refused_in_one_line():
    class OwnForward(torchvision.models.VisionTransformer):
        def forward(self, x):
            return super().forward(x) * 2

    model = OwnForward(image_size=32, patch_size=4, num_layers=1, num_heads=2, hidden_dim=32, mlp_dim=64)
    with pytest.raises(UnsupportedModelError, match="overrides") as err:
        apply_tome(model, 2)
    assert "\n" not in str(err.value)
    model = make_tiny()
    model.encoder.layers[1] = nn.Identity()
    with pytest.raises(UnsupportedModelError, match="block 1 .* Identity") as err:
        apply_tome(model, 2)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# The torchvision:<builder> source form


@pytest.fixture(scope="module")
def vit_b_16_at_64(tmp_path_factory):
    """A state dict of torchvision.models.vit_b_16(image_size=64) with random weights, as torch.save writes it."""
    torch.manual_seed(1)
    model = torchvision.models.vit_b_16(image_size=64)
    path = tmp_path_factory.mktemp("torchvision") / "W.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


@pytest.mark.slow
def test_cli_exports_a_torchvision_checkpoint_and_it_passes(vit_b_16_at_64, tmp_path, capsys):
    from tome_deploy.cli import export as export_cli

    path, _ = vit_b_16_at_64
    out = tmp_path / "x.onnx"
    code = export_cli.main(
        ["torchvision:vit_b_16", "--img-size", "64", "--checkpoint", str(path), "--r", "4", "-o", str(out)]
    )
    err = capsys.readouterr().err
    assert code == 0, err
    assert "PASS" in err and "FAIL" not in err and "random init" not in err
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["tome.input"])["shape"] == [3, 64, 64]


def test_a_checkpoint_loads_at_the_size_it_was_trained_at(vit_b_16_at_64):
    from tome_deploy.models.loading.dispatch import load_model

    path, state = vit_b_16_at_64
    loaded = load_model("torchvision:vit_b_16", checkpoint=str(path))  # no --img-size: the checkpoint's 64
    assert not loaded.random_weights and "W.pth" in loaded.weights
    assert loaded.model.image_size == 64
    assert all(torch.equal(value, state[key]) for key, value in loaded.model.state_dict().items())


def test_random_init_is_seeded():
    from tome_deploy.models.loading.dispatch import load_model

    first, again, other = (load_model("torchvision:vit_b_32", img_size=64, seed=s).model for s in (3, 3, 4))
    assert first.image_size == 64 and ADAPTER.output_kind(first) == "logits"
    weight = lambda m: m.encoder.layers[0].self_attention.in_proj_weight  # noqa: E731
    assert torch.equal(weight(first), weight(again)) and not torch.equal(weight(first), weight(other))


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["torchvision:vit_q_16"], ["vit_q_16", "torchvision:vit_b_16", "torchvision:vit_h_14"]),
        (["torchvision:vit_b_16", "--pretrained"], ["--checkpoint"]),
        (["torchvision:vit_b_16", "--img-size", "100"], ["not a multiple of the patch size 16", "96 or 112"]),
        (["torchvision:vit_h_14", "--img-size", "500"], ["patch size 14", "490 or 504"]),
    ],
)
def test_bad_sources_are_refused_in_one_line(args, fragments, tmp_path, capsys):
    from tome_deploy.cli import export as export_cli

    assert export_cli.main([*args, "-o", str(tmp_path / "m.onnx"), "--no-validate"]) == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "m.onnx").exists()


def test_a_checkpoint_of_another_image_size_is_refused_in_one_line(vit_b_16_at_64, tmp_path, capsys):
    from tome_deploy.cli import export as export_cli

    path, _ = vit_b_16_at_64
    args = ["torchvision:vit_b_16", "--img-size", "96", "--checkpoint", str(path), "-o", str(tmp_path / "m.onnx")]
    assert export_cli.main(args) == 2
    assert_one_line_error(capsys.readouterr().err, "trained at 64 px", "--img-size 96")
    args = ["torchvision:vit_b_32", "--checkpoint", str(path), "-o", str(tmp_path / "m.onnx")]
    assert export_cli.main(args) == 2
    assert_one_line_error(capsys.readouterr().err, "not a torchvision:vit_b_32 checkpoint")


# ---------------------------------------------------------------------------------------------------------
# Runtimes and serving: the tiny model exported once per formulation at r=8 (dynamic batch, traced at 2)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """merge -> (ToMe model, metadata, path) of the plain tiny model with scatter, matmul and the fused merge op."""
    folder = tmp_path_factory.mktemp("torchvision_exports")
    result = {}
    for merge in ("scatter", "matmul", "plugin"):
        tome, schedule = apply_tome(model_of("plain"), R, merge)
        metadata = build_metadata(
            tome,
            schedule,
            R,
            arch="torchvision_vit",
            weights="random (test)",
            weights_sha256="test",
            merge=merge,
            opset=18,
            batch=None,
            example_batch=2,
        )
        result[merge] = tome, metadata, export_onnx(tome, metadata, folder / f"tv_{merge}.onnx").path
    return result


@pytest.mark.slow  # its fixture exports the three formulations (~9 s on 2 cores)
def test_exported_graph_matches_pytorch_with_only_the_batch_symbolic(exports):
    tome, metadata, path = exports["matmul"]
    report = validate_onnx(tome, path, metadata, batch_sizes=[1, 3])  # traced at 2
    assert report.passed, report.table()
    x = pixels(batch=3, seed=5)
    with OnnxRuntimeRunner(path) as runner:
        got = runner.infer({metadata.input.name: x.numpy()})[metadata.output_name]
    with torch.inference_mode():
        assert np.abs(got - tome(x).numpy()).max() <= 1e-4
    graph = onnx.load(str(path)).graph
    assert io_symbolic_dims(graph) == {"batch"}
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [3, 32, 32]


def run_onnx(path, x: torch.Tensor, runner: str = "onnxruntime") -> np.ndarray:
    """[B, 10] logits of the export at `path` for pixels [B, 3, 32, 32] in ONNX Runtime or OpenVINO."""
    from tome_deploy.runtime.openvino import OpenVINORunner

    with OnnxRuntimeRunner(path) if runner == "onnxruntime" else OpenVINORunner(path) as session:
        return session.infer({"pixel_values": x.numpy()})["logits"]


def test_plugin_export_equals_scatter_and_matmul_in_onnx_runtime(exports):
    """One fused tome::TokenMerge node per block, run by ONNX Runtime's Python op, at batch 3 (traced at 2)."""
    from tome_deploy.token_merge import contract

    plugin_graph = onnx.load(str(exports["plugin"][2])).graph
    assert sum(node.op_type == contract.OP_TYPE for node in plugin_graph.node) == 3
    x = pixels(batch=3, seed=5)
    scatter, matmul, plugin = (run_onnx(exports[merge][2], x) for merge in ("scatter", "matmul", "plugin"))
    expected = reference_torchvision(model_of("plain"), x, [R, R, R]).numpy()
    assert np.abs(scatter - expected).max() <= 1e-4
    np.testing.assert_allclose(matmul, scatter, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(plugin, scatter, atol=1e-5, rtol=1e-5)


def test_openvino_runs_scatter_and_matmul_as_onnx_runtime(exports):
    x = pixels(batch=2, seed=6)
    for merge in ("scatter", "matmul"):
        path = exports[merge][2]
        np.testing.assert_allclose(run_onnx(path, x, "openvino"), run_onnx(path, x), atol=1e-4, rtol=1e-4)


@pytest.mark.tensorrt
def test_tensorrt_rtx_builds_the_matmul_export_ahead_of_time(exports, capsys):
    from conftest import build_rtx_engine

    _, metadata, path = exports["matmul"]
    sidecar = build_rtx_engine(path, path.with_suffix(".plan"), capsys)
    assert sidecar.input_name == "pixel_values" and sidecar.input_shape == [3, 32, 32]
    assert sidecar.tome.r_effective == metadata.r_effective == [R, R, R]


def test_tome_serve_answers_as_onnx_runtime(exports):
    from serve_process import infer_body, post_json, tome_serve

    path = exports["scatter"][2]
    x = pixels(batch=2, seed=8)
    with tome_serve(path, "tv") as url:
        status, answer = post_json(url, "/v2/models/tv/infer", infer_body("pixel_values", x.numpy()))
    assert status == 200 and answer["outputs"][0]["shape"] == [2, 10]
    expected = run_onnx(path, x)
    np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], expected.shape), expected, atol=1e-5)


def test_tome_deploy_writes_a_triton_repository(exports, tmp_path, capsys):
    """tome-deploy triton-repo: Triton's ONNX Runtime backend, batched, with the export's shapes (config only)."""
    from tome_deploy.cli import deploy as deploy_cli

    path = exports["scatter"][2]
    assert deploy_cli.main(["triton-repo", str(path), str(tmp_path), "--name", "tv", "--max-batch", "8"]) == 0, (
        capsys.readouterr().err
    )
    config = (tmp_path / "tv" / "config.pbtxt").read_text()
    for line in ('platform: "onnxruntime_onnx"', "max_batch_size: 8", 'name: "pixel_values"', "dims: [3, 32, 32]"):
        assert line in config, config
    assert 'name: "logits"' in config and "dims: [10]" in config
    assert 'string_value: "[65, 57, 49, 41]"' in config  # tome.tokens_per_layer
    assert (tmp_path / "tv" / "1" / "model.onnx").read_bytes() == path.read_bytes()
