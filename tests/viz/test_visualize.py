"""tome-visualize: the merge map against source tracking, the rendering, and the command end to end."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FAMILIES, assert_one_line_error, make_model
from PIL import Image

from tome_deploy.cli import visualize as visualize_cli
from tome_deploy.errors import InvalidInputError
from tome_deploy.models.patch import apply_tome, track_sources
from tome_deploy.models.timm_vit import input_spec
from tome_deploy.validation.probes import SAMPLE_PHOTOS, sample_photo
from tome_deploy.viz.merges import (
    load_image,
    merge_groups,
    model_input,
    render_merges,
    save_png,
)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> str:
    """A natural photo (scikit-learn's sample image china.jpg, shipped with the package) saved as a JPEG file."""
    path = tmp_path_factory.mktemp("img") / "china.jpg"
    sample_photo(SAMPLE_PHOTOS[0]).save(path, quality=90)
    return str(path)


# Every family tome-export supports: class token, registers + mean pool, MAP pool, distilled DeiT, DeiT-3.
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_groups_are_the_final_tokens_and_cover_every_patch_once(family, photo):
    name, kwargs, r, _ = FAMILIES[family]
    model = make_model(name, kwargs)
    tome, schedule = apply_tome(model, r)
    pixels, rgb = model_input(load_image(photo), input_spec(model))
    groups, sizes = merge_groups(tome, pixels)

    prefix = schedule.num_prefix
    grid_h, grid_w = model.patch_embed.grid_size
    assert groups.shape == (grid_h, grid_w) and rgb.shape == (*pixels.shape[1:], 3) and rgb.dtype == np.uint8
    final_patch_tokens = schedule.tokens[-1] - prefix
    assert len(np.unique(groups)) == final_patch_tokens == len(sizes)
    assert set(np.unique(groups)) == set(range(final_patch_tokens))
    # Every patch is in exactly one group (one id per cell), and each group's patch count is its token's size.
    assert np.array_equal(np.bincount(groups.ravel(), minlength=final_patch_tokens), sizes)
    assert sizes.sum() == grid_h * grid_w
    with torch.no_grad():
        source, size = track_sources(tome, torch.as_tensor(pixels)[None])
    assert np.array_equal(sizes, size[0, prefix:, 0].round().long().numpy())
    # Independently from the one-hot source: patch j is in group g exactly when source[g + prefix, j + prefix] is set.
    patches = source[0, prefix:, prefix:].numpy()
    assert np.array_equal(patches.sum(axis=0), np.ones(grid_h * grid_w))
    assert np.array_equal(patches[groups.ravel(), np.arange(grid_h * grid_w)], np.ones(grid_h * grid_w))


def test_without_merging_every_patch_is_its_own_group(photo):
    model = make_model("test_vit", {})
    tome, _ = apply_tome(model, 0)
    groups, sizes = merge_groups(tome, model_input(load_image(photo), input_spec(model))[0])
    assert np.array_equal(groups.ravel(), np.arange(100)) and (sizes == 1).all()


def test_eval_transform_crop_round_trips():
    """The drawn image is the model's input, un-normalised: normalising it again gives the same pixels."""
    model = make_model("test_vit", {})
    spec = input_spec(model)
    config = spec.preprocessing
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8))
    pixels, rgb = model_input(image, spec)
    again = (rgb.transpose(2, 0, 1) / 255.0 - np.asarray(config["mean"])[:, None, None]) / np.asarray(config["std"])[
        :, None, None
    ]
    assert np.abs(again - pixels).max() < 0.5 / 255 / min(config["std"]) + 1e-5


def test_render_paints_one_colour_per_group_with_borders_between():
    groups = np.array([[0, 0, 1], [2, 2, 1], [2, 3, 3]])
    image = np.random.default_rng(1).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    flat = np.asarray(render_merges(image, groups, style="mean", border=0))
    cells = flat.reshape(3, 4, 3, 4, 3)  # [row, y, col, x, rgb]
    for g in range(4):
        rows, cols = np.nonzero(groups == g)
        colours = {tuple(cells[i, y, j, x]) for i, j in zip(rows, cols) for y in range(4) for x in range(4)}
        assert len(colours) == 1  # one flat colour per group: its mean over the group's pixels
        block = np.concatenate([image[4 * i : 4 * i + 4, 4 * j : 4 * j + 4].reshape(-1, 3) for i, j in zip(rows, cols)])
        assert np.allclose(colours.pop(), block.mean(axis=0), atol=0.51)
    bordered = np.asarray(render_merges(image, groups, style="mean", scale=2, border=1, border_colour=(255, 0, 255)))
    assert bordered.shape == (24, 24, 3)
    magenta = (bordered == (255, 0, 255)).all(axis=-1)
    # Borders only where neighbouring groups differ (cells are 8 px; the border pixel is the one after the change).
    assert magenta[0:8, 16].all() and magenta[16:24, 8].all() and magenta[8, 0:8].all()
    assert not magenta[0:8, 8].any() and not magenta[0:8, 0:8].any()
    overlay = np.asarray(render_merges(image, groups, style="overlay", scale=3))
    assert overlay.shape == (36, 36, 3)
    with pytest.raises(InvalidInputError):
        render_merges(image.astype(np.float32), groups)


def test_save_png_refuses_a_missing_folder(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        save_png(Image.new("RGB", (4, 4)), tmp_path / "missing" / "m.png")
    save_png(Image.new("RGB", (4, 4)), tmp_path / "m.png")
    assert Image.open(tmp_path / "m.png").size == (4, 4) and list(tmp_path.iterdir()) == [tmp_path / "m.png"]


def test_cli_writes_a_png_of_the_input_and_its_merges(capsys, photo, tmp_path):
    out = tmp_path / "merges.png"
    assert visualize_cli.main(["test_vit", photo, "--r", "8", "-o", str(out), "--scale", "2"]) == 0
    err = capsys.readouterr().err
    assert "100 patches -> 52 merged tokens" in err and "random weights" in err
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (2 * 160 * 2 + 8, 160 * 2)  # input | merges, 8 px apart
    alone = tmp_path / "alone.png"
    assert (
        visualize_cli.main(
            [
                "test_vit",
                photo,
                "--r-inflect",
                "-1",
                "--r",
                "8",
                "-o",
                str(alone),
                "--merges-only",
                "--style",
                "overlay",
                "--img-size",
                "96",
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr().err == ""
    with Image.open(alone) as image:
        assert image.size == (384, 384)  # 96 px, upscaled 4x by default


@pytest.mark.parametrize(
    "model, r, summary",
    [
        ("open_clip:ViT-B-32", "2", "7x7 = 49 patches -> 25 merged tokens after 12 blocks"),  # 49 - 12 * 2
        (
            "eva02_tiny_patch14_224",
            "8",
            "16x16 = 256 patches -> 160 merged tokens after 12 blocks",
        ),  # 256 - 12 * 8, RoPE
    ],
)
def test_cli_draws_the_merges_of_other_families(capsys, photo, tmp_path, model, r, summary):
    pytest.importorskip("open_clip")
    out = tmp_path / "merges.png"
    assert visualize_cli.main([model, photo, "--r", r, "-o", str(out), "--merges-only"]) == 0
    assert summary in capsys.readouterr().err
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 0


def test_cli_refuses_bad_images_and_paths_with_one_line(capsys, photo, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cases = [
        ([str(broken), "-o", str(tmp_path / "a.png")], ("cannot be decoded", "broken.jpg")),
        ([str(tmp_path / "nothing.jpg"), "-o", str(tmp_path / "a.png")], ("does not exist",)),
        ([photo, "-o", str(tmp_path / "no" / "a.png")], ("output directory", "does not exist")),
        ([photo, "-o", str(tmp_path / "a.jpg")], (".png",)),
    ]
    for args, fragments in cases:
        assert visualize_cli.main(["test_vit", *args]) == 2
        assert_one_line_error(capsys.readouterr().err, *fragments)
    assert list(tmp_path.iterdir()) == [broken]  # nothing half-written


def test_help_runs_without_heavy_imports():
    probe = (
        "import sys, runpy; sys.argv=['x', '--help']\n"
        "try:\n    runpy.run_module('tome_deploy.cli.visualize', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'timm', 'numpy', 'PIL') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: tome-visualize" in result.stdout and "--r-inflect" in result.stdout


def test_a_model_whose_input_is_not_an_image_is_refused_with_one_line(photo):
    from tome_deploy.artifact.input_spec import InputSpec

    spectrogram = {
        "feature_extractor": "ASTFeatureExtractor",
        "sampling_rate": 16000,
        "num_mel_bins": 16,
        "max_length": 32,
        "mean": -4.27,
        "std": 4.57,
        "do_normalize": True,
    }
    spec = InputSpec.from_dict(
        {"kind": "audio_spectrogram", "name": "input_values", "shape": [32, 16], "preprocessing": spectrogram}
    )
    with pytest.raises(
        InvalidInputError, match=r"draws merges on an image, but this model takes an audio spectrogram input"
    ):
        model_input(load_image(photo), spec)
