"""read_image_folder and ImageSet.pixels on folders written here: layouts, labels, order, refusals, lazy decoding."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from PIL import Image

from tome_deploy.errors import InvalidInputError
from tome_deploy.quality.data import DataConfig, check_decoded, read_image_folder

# 2x2 images enlarged to 4x4 by pixel repetition; mean 0 and std 1 leave value / 255.
CONFIG = DataConfig(
    input_size=[3, 4, 4], mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], interpolation="nearest", crop_pct=1.0
)


def write_png(path, value: int) -> None:
    """A 2x2 grey PNG whose top-left pixel is `value` and the rest 0."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((2, 2), np.uint8)
    pixels[0, 0] = value
    Image.fromarray(pixels, mode="L").save(path)


def test_image_folder_by_class_index_in_class_order(tmp_path):
    for folder, name, value in [("2", "a.png", 20), ("0", "b.png", 0), ("0", "a.png", 255), ("10", "z.png", 100)]:
        write_png(tmp_path / folder / name, value)
    images = read_image_folder(tmp_path)
    # class order is numeric (2 before 10), then the path within the class
    assert images.files == ("0/a.png", "0/b.png", "2/a.png", "10/z.png")
    assert images.labels == (0, 0, 2, 10)
    assert images.num_classes == 11
    digest = hashlib.sha256()
    for name in images.files:
        digest.update(name.encode() + (tmp_path / name).read_bytes())
    assert images.fingerprint == digest.hexdigest()


def test_pixels_decodes_only_the_indices_asked_for(tmp_path):
    for folder, value in [("0", 255), ("1", 51), ("2", 0)]:
        write_png(tmp_path / folder / "x.png", value)
    images = read_image_folder(tmp_path)
    assert images.loaded == []  # reading the folder decodes nothing
    pixels, decoded = images.pixels([1], CONFIG)
    assert images.loaded == ["1/x.png"] and decoded == [1]
    assert pixels.dtype == np.float32 and pixels.shape == (1, 3, 4, 4)
    # the top-left 2x2 block is the one pixel of value 51, repeated; 51 / 255 = 0.2
    assert np.allclose(pixels[0, :, :2, :2], 0.2) and np.allclose(pixels[0, :, 2:, :], 0.0)


def test_flat_folder_has_no_labels_and_ignores_hidden_and_other_files(tmp_path):
    write_png(tmp_path / "b.png", 1)
    write_png(tmp_path / "a.jpeg.png", 2)
    write_png(tmp_path / ".hidden.png", 3)
    (tmp_path / "notes.txt").write_text("not an image")
    os.symlink(tmp_path / "b.png", tmp_path / "c.png")
    images = read_image_folder(tmp_path)
    assert images.files == ("a.jpeg.png", "b.png", "c.png")
    assert images.labels is None and images.num_classes is None
    _, decoded = images.pixels([0, 1, 2], CONFIG)
    assert decoded == [0, 1, 2]


def test_hidden_folders_inside_a_class_are_ignored(tmp_path):
    write_png(tmp_path / "0" / "a.png", 1)
    write_png(tmp_path / "0" / ".thumbs" / "a.png", 1)
    write_png(tmp_path / ".cache" / "a.png", 1)
    assert read_image_folder(tmp_path).files == ("0/a.png",)


def test_labels_file_names_class_folders(tmp_path):
    write_png(tmp_path / "data" / "dog" / "1.png", 1)
    write_png(tmp_path / "data" / "cat" / "1.png", 1)
    write_png(tmp_path / "data" / "2" / "1.png", 1)  # an index below the number of labels is also a class
    labels = tmp_path / "labels.txt"
    labels.write_text("dog\ncat\nbird\n")
    images = read_image_folder(tmp_path / "data", labels)
    assert images.files == ("dog/1.png", "cat/1.png", "2/1.png")
    assert images.labels == (0, 1, 2)
    assert images.num_classes == 3


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    write_png(tmp_path / "0" / "good.png", 255)
    (tmp_path / "0" / "bad.png").write_bytes(b"not a png")
    images = read_image_folder(tmp_path)
    pixels, decoded = images.pixels([0, 1], CONFIG)
    assert images.files == ("0/bad.png", "0/good.png")
    assert decoded == [1] and pixels.shape == (1, 3, 4, 4)
    assert images.unreadable == {"0/bad.png"}
    assert images.loaded == ["0/bad.png", "0/good.png"]
    check_decoded(images, len(decoded))  # something decoded: no error


def test_a_folder_of_only_unreadable_files_is_refused_before_any_metric(tmp_path):
    for name in ("a.png", "b.jpg"):
        (tmp_path / name).write_bytes(b"garbage")
    images = read_image_folder(tmp_path)  # nothing is decoded yet, so nothing is known to be unreadable
    pixels, decoded = images.pixels([0, 1], CONFIG)
    assert pixels.shape == (0, 3, 4, 4) and decoded == []
    with pytest.raises(InvalidInputError, match="none of the 2 image files .* could be decoded") as caught:
        check_decoded(images, len(decoded))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "layout, message",
    [
        ("missing", "does not exist"),
        ("file", "is a file"),
        ("empty", "holds no image files"),
        ("only_text", "holds no image files"),
        ("empty_classes", "holds no image files"),
        ("named_classes", "class folders cat, dog map to no class"),
        ("mixed", "holds both images"),
    ],
)
def test_refusals(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout == "file":
        root.write_bytes(b"x")
    elif layout != "missing":
        root.mkdir()
    if layout == "only_text":
        (root / "readme.txt").write_text("x")
    if layout == "empty_classes":
        (root / "0").mkdir()
    if layout == "named_classes":
        write_png(root / "cat" / "a.png", 1)
        write_png(root / "dog" / "a.png", 1)
    if layout == "mixed":
        write_png(root / "0" / "a.png", 1)
        write_png(root / "b.png", 1)
    with pytest.raises(InvalidInputError, match=message) as caught:
        read_image_folder(root)
    assert "\n" not in str(caught.value)


def test_labels_refusals(tmp_path):
    write_png(tmp_path / "data" / "cat" / "a.png", 1)
    write_png(tmp_path / "data" / "7" / "a.png", 1)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    with pytest.raises(InvalidInputError, match="class folder 7 maps to no class"):
        read_image_folder(tmp_path / "data", labels)  # 7 is not below the 2 labels
    with pytest.raises(InvalidInputError, match="cannot be read"):
        read_image_folder(tmp_path / "data", tmp_path / "missing.txt")
    labels.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(InvalidInputError, match="cannot be read"):
        read_image_folder(tmp_path / "data", labels)
    labels.write_text("\n\n")
    with pytest.raises(InvalidInputError, match="is empty"):
        read_image_folder(tmp_path / "data", labels)


def test_quality_needs_an_image_input_and_says_so_for_another_kind():
    from tome_deploy.artifact.input_spec import InputSpec, image_spec

    image = image_spec("pixel_values", [3, 8, 8], [0.5] * 3, [0.25] * 3, "bilinear", 0.9)
    assert DataConfig.of(image, "tome-tune") == DataConfig([3, 8, 8], [0.5] * 3, [0.25] * 3, "bilinear", 0.9)
    video = InputSpec.from_dict(
        {
            **image.to_dict(),
            "kind": "video",
            "shape": [4, 3, 8, 8],
            "preprocessing": {**image.preprocessing, "sampling": "uniform"},
        }
    )
    with pytest.raises(InvalidInputError) as caught:
        DataConfig.of(video, "tome-tune")
    assert str(caught.value) == (
        "tome-tune measures quality on a folder of images, but this model takes a video input "
        "[4, 3, 8, 8] (frames, channels, height, width); use an image model"
    )
