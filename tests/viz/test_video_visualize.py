"""tome-visualize on a video model (tome_deploy/viz/video.py): frames sampled uniformly from a folder or a GIF,
every tubelet in exactly one group, a PNG row of frames or an animated GIF, and one-line refusals when a clip meets
an image model or an image meets a video model. The model is the tiny seeded VideoMAE of tests/family_sources.py
(clips of 4 frames of 32 x 32, tubelets of 2 x 8 x 8: 2 x 4 x 4 = 32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from family_sources import hf_video_folder
from PIL import Image

from tome_deploy.cli import visualize as visualize_cli
from tome_deploy.viz.video import uniform_indices

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def videomae(tmp_path_factory) -> str:
    return hf_video_folder(tmp_path_factory.mktemp("viz_video") / "videomae", "VideoMAEForVideoClassification").name


def moving_square(count: int, side: int = 40) -> list[Image.Image]:
    """Frames of a bright square moving right over a dark gradient."""
    frames = []
    for t in range(count):
        pixels = np.tile(np.linspace(0, 120, side, dtype=np.uint8)[None, :, None], (side, 1, 3))
        pixels[10:22, 2 + 3 * t : 14 + 3 * t] = (250, 200, 40)
        frames.append(Image.fromarray(pixels))
    return frames


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    """The same 6 frames as a GIF and as a folder of PNGs."""
    root = tmp_path_factory.mktemp("clips")
    frames = moving_square(6)
    gif = root / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    folder = root / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"frame_{i:02d}.png")
    return {"gif": gif, "folder": folder}


def test_uniform_sampling_takes_the_middle_frame_of_equal_parts():
    assert uniform_indices(10, 4) == [1, 3, 6, 8]
    assert uniform_indices(6, 4) == [0, 2, 3, 5]
    assert uniform_indices(2, 4) == [0, 0, 1, 1]  # a short clip repeats frames


@pytest.mark.parametrize("kind", ["gif", "folder"])
def test_the_png_shows_the_frames_over_their_merges_and_every_tubelet_once(videomae, clips, kind, tmp_path, capsys):
    out = tmp_path / "merges.png"
    assert visualize_cli.main([videomae, str(clips[kind]), "--r", "6", "-o", str(out), "--scale", "2"]) == 0
    err = capsys.readouterr().err
    # 32 tubelets, r=6 in 2 layers: 20 groups, each tubelet in one
    assert "2x4x4 = 32 tubelets -> 20 merged tokens after 2 blocks" in err
    with Image.open(out) as image:
        # 4 frames of 64 px (32 x 2) in a row, 8 px apart; the inputs above the merges
        assert image.format == "PNG" and image.size == (4 * 64 + 3 * 8, 2 * 64 + 8)


def test_the_gif_animates_the_sampled_frames(videomae, clips, tmp_path, capsys):
    out = tmp_path / "merges.gif"
    args = [videomae, str(clips["gif"]), "--r", "6", "-o", str(out), "--scale", "2", "--merges-only"]
    assert visualize_cli.main(args) == 0
    with Image.open(out) as image:
        assert image.format == "GIF" and image.n_frames == 4 and image.size == (64, 64)


def test_groups_cover_each_tubelet_once_and_merge_nothing_at_r0(videomae, clips):
    from tome_deploy.models.loading.dispatch import load_model
    from tome_deploy.models.patch import apply_tome
    from tome_deploy.viz.video import clip_input, clip_merge_groups, load_clip

    loaded = load_model(videomae)
    spec = loaded.adapter.input_spec(loaded.model)
    pixels, rgb = clip_input(load_clip(clips["folder"], 4), spec)
    assert pixels.shape == (4, 3, 32, 32) and rgb.shape == (4, 32, 32, 3)
    for r, groups_expected in ((0, 32), (6, 20)):
        tome, _ = apply_tome(loaded.model, r)
        groups, sizes = clip_merge_groups(tome, pixels)
        assert groups.shape == (2, 4, 4)
        assert sorted(set(groups.ravel().tolist())) == list(range(groups_expected))
        assert np.array_equal(np.bincount(groups.ravel(), minlength=groups_expected), sizes)


def test_a_clip_and_an_image_meet_the_wrong_model_with_one_line(videomae, clips, tmp_path, capsys):
    still = tmp_path / "still.png"
    moving_square(1)[0].save(still)
    assert visualize_cli.main([videomae, str(still), "-o", str(tmp_path / "a.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "takes a video clip", "folder of frames or a GIF")
    assert visualize_cli.main(["test_vit", str(clips["gif"]), "-o", str(tmp_path / "b.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "is a clip", "pass an image file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert visualize_cli.main([videomae, str(empty), "-o", str(tmp_path / "c.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "holds no frames")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "still.png"]  # nothing written
