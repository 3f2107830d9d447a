"""ToMe for transformers' video classifiers (models/hf_video.py): VideoMAE and ViViT from save_pretrained folders
with seeded weights (tests/family_sources.py), checked against tests/reference_video.py, a plain float64
reference that does not import tome_deploy; TimeSformer and VideoMAE without mean pooling refused."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error
from family_sources import hf_video_folder
from reference_video import reference_videomae, reference_vivit

from tome_deploy.errors import UnsupportedModelError
from tome_deploy.models.loading.dispatch import load_model
from tome_deploy.models.patch import apply_tome, track_sources

transformers = pytest.importorskip("transformers")

# class -> (reference, prefix tokens, r): 32 tubelet tokens (plus ViViT's class token), 2 layers
VIDEO_CLASSES = {
    "VideoMAEForVideoClassification": (reference_videomae, 0, 6),
    "VideoMAEModel": (reference_videomae, 0, 6),
    "VivitForVideoClassification": (reference_vivit, 1, 6),
}


@pytest.fixture(scope="module")
def video_folders(tmp_path_factory) -> dict[str, Path]:
    """class -> its save_pretrained folder (written once per module)."""
    root = tmp_path_factory.mktemp("hf_video")
    return {name: Path(hf_video_folder(root / name, name).name) for name in VIDEO_CLASSES}


@functools.cache
def _loaded(folder: Path):
    return load_model(str(folder))


def clip(batch: int = 2, seed: int = 0) -> torch.Tensor:
    """[B, T, 3, H, W]: 4 frames of 32 x 32."""
    return torch.randn(batch, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(VIDEO_CLASSES))
def test_loads_as_its_video_family_with_tubelet_tokens(video_folders, name):
    loaded = _loaded(video_folders[name])
    prefix = VIDEO_CLASSES[name][1]
    assert type(loaded.model.hf).__name__ == name
    assert loaded.adapter.num_prefix_tokens(loaded.model) == prefix
    assert loaded.adapter.tokens_at_input(loaded.model) == 2 * 4 * 4 + prefix  # (4 / 2) x (32 / 8) x (32 / 8)
    spec = loaded.adapter.input_spec(loaded.model)
    assert (spec.kind, spec.shape) == ("video", (4, 3, 32, 32))


@pytest.mark.parametrize("name", sorted(VIDEO_CLASSES))
def test_r0_equals_the_model_and_the_reference(video_folders, name):
    model = _loaded(video_folders[name]).model
    tome, schedule = apply_tome(model, 0)
    x = clip()
    with torch.inference_mode():
        plain, got = model(x), tome(x)
    assert schedule.effective == (0, 0)
    assert (got - plain).abs().max() <= 1e-5
    expected = VIDEO_CLASSES[name][0](model.hf, x, [0, 0])
    assert (plain - expected).abs().max() <= 1e-4  # the reference is the model itself at r=0


@pytest.mark.parametrize("name", sorted(VIDEO_CLASSES))
def test_tome_equals_the_plain_reference(video_folders, name):
    model = _loaded(video_folders[name]).model
    reference, _, r = VIDEO_CLASSES[name]
    tome, schedule = apply_tome(model, r)
    assert schedule.tokens[-1] < schedule.tokens[0]  # it really merges
    x = clip()
    with torch.inference_mode():
        got, unmerged = tome(x), model(x)
    expected = reference(model.hf, x, list(schedule.effective))
    assert got.shape == expected.shape
    assert (got - expected).abs().max() <= 1e-4, (got - expected).abs().max()
    assert (unmerged - expected).abs().max() > 1e-3  # the reference is not just the plain model


def test_scatter_and_matmul_agree(video_folders):
    model = _loaded(video_folders["VideoMAEForVideoClassification"]).model
    x = clip()
    with torch.inference_mode():
        scatter, matmul = (apply_tome(model, 6, f)[0](x) for f in ("scatter", "matmul"))
    assert (scatter - matmul).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["VideoMAEForVideoClassification", "VivitForVideoClassification"])
def test_source_tracking_covers_every_tubelet_once(video_folders, name):
    loaded = _loaded(video_folders[name])
    tome, schedule = apply_tome(loaded.model, 6)
    source, size = track_sources(tome, clip(batch=1))
    p = schedule.num_prefix
    assert source.shape[1:] == (schedule.tokens[-1], schedule.tokens[0])
    assert torch.equal(source[0, :, p:].sum(dim=0), torch.ones(source.shape[2] - p))
    assert torch.allclose(size[0, :, 0], source[0].sum(dim=1))


def test_frame_preprocessing_comes_from_the_folders_processor(tmp_path):
    """VideoMAE's image processor saved into the folder: its mean / std, resample and crop (224 of 256)."""
    folder = tmp_path / "videomae"
    hf_video_folder(folder, "VideoMAEForVideoClassification")
    transformers.VideoMAEImageProcessor(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        resample=3,
    ).save_pretrained(folder)
    loaded = load_model(str(folder))
    preprocessing = loaded.adapter.input_spec(loaded.model).preprocessing
    assert preprocessing["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert preprocessing["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert (preprocessing["interpolation"], preprocessing["sampling"]) == ("bicubic", "uniform")
    assert preprocessing["crop_pct"] == pytest.approx(224 / 256)


def test_vivit_mean_and_std_fold_its_offset_rescale(video_folders):
    """ViViT's processor maps pixels to [-1, 1] (x / 127.5 - 1) before it normalises; the spec's mean and std on
    [0, 1] pixels must give the processor's own numbers."""
    loaded = _loaded(video_folders["VivitForVideoClassification"])
    preprocessing = loaded.adapter.input_spec(loaded.model).preprocessing
    frame = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    processor = transformers.VivitImageProcessor(do_resize=False, do_center_crop=False)
    expected = np.asarray(processor([[frame]], return_tensors="np")["pixel_values"])[0, 0]  # [3, H, W]
    mean, std = (np.asarray(preprocessing[key])[:, None, None] for key in ("mean", "std"))
    got = (frame.transpose(2, 0, 1) / 255.0 - mean) / std
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_videomae_without_mean_pooling_is_refused(tmp_path):
    folder = tmp_path / "token0"
    hf_video_folder(folder, "VideoMAEForVideoClassification", use_mean_pooling=False)
    with pytest.raises(UnsupportedModelError, match="use_mean_pooling"):
        load_model(str(folder))


def test_timesformer_is_refused_with_one_line(tmp_path, capsys):
    from tome_deploy.cli import export as export_cli

    folder = tmp_path / "timesformer"
    hf_video_folder(folder, "TimesformerForVideoClassification")
    assert export_cli.main([str(folder), "--r", "4", "-o", str(tmp_path / "x.onnx")]) == 2
    assert_one_line_error(capsys.readouterr().err, "TimesformerForVideoClassification", "divided space-time attention")
    assert not (tmp_path / "x.onnx").exists()


def test_videomae_base_at_16_frames_of_224_has_1568_tokens():
    """The default VideoMAEConfig (ViT-B, 16 frames of 224 x 224, tubelets of 2 x 16 x 16), built on the meta
    device: 8 x 14 x 14 tokens, no prefix token, 12 layers of width 768."""
    from tome_deploy.models.adapter import adapter_for, describe
    from tome_deploy.models.hf_video import HFVideoModel

    with torch.device("meta"):
        model = HFVideoModel(transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig()))
    shape = describe(adapter_for(model), model)
    assert (shape.tokens, shape.num_prefix, shape.depth, shape.width, shape.mlp_ratio) == (1568, 0, 12, 768, 4.0)


def test_a_config_that_does_not_fit_the_weights_is_refused_before_loading(tmp_path):
    """The image family's folder checks hold for video: ViViT's position table is sized by num_frames, so a
    config.json asking for 8 frames does not fit weights saved for 4."""
    import json

    from tome_deploy.errors import ModelLoadError

    folder = tmp_path / "vivit"
    hf_video_folder(folder, "VivitForVideoClassification")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_frames": 8}))
    with pytest.raises(ModelLoadError, match="position_embeddings"):
        load_model(str(folder))


@pytest.mark.parametrize(("key", "value"), [("rescale_factor", -1), ("offset", "yes")])
def test_a_bad_processor_value_fails_the_load_with_one_line(tmp_path, key, value):
    import json

    from tome_deploy.errors import ModelLoadError

    folder = tmp_path / "vivit"
    hf_video_folder(folder, "VivitForVideoClassification")
    (folder / "preprocessor_config.json").write_text(json.dumps({key: value}))
    with pytest.raises(ModelLoadError, match=f"preprocessor_config.json has {key}") as caught:
        load_model(str(folder))
    assert "\n" not in str(caught.value)
