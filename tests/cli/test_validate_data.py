"""tome-validate --data end to end on the bundled digits model: an ImageFolder of digits written here,
the quality table, the budget's exit codes and one-line refusals of bad data."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import assert_one_line_error
from PIL import Image

from tome_deploy.cli import export as export_cli
from tome_deploy.cli import validate as validate_cli
from tome_deploy.models.digits import digits_data

IMAGES = 200  # the first digits of the shipped set: enough for stable metrics, quick to run


@pytest.fixture(scope="module")
def digits_export(tmp_path_factory):
    """(the digits ViT exported at r=3, an ImageFolder of IMAGES digits as 8x8 PNGs in folders "0".."9")."""
    folder = tmp_path_factory.mktemp("digits")
    onnx_path = folder / "x.onnx"
    assert export_cli.main(["tome_digits_vit", "--r", "3", "-o", str(onnx_path), "--no-validate", "--quiet"]) == 0
    data = digits_data()
    root = folder / "images"
    for index, (image, label) in enumerate(zip(data["images"][:IMAGES], data["labels"][:IMAGES])):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        pixels = np.round(image.astype(np.float64) * 255 / 16).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(root / str(label) / f"{index:04d}.png")
    return onnx_path, root


def run_validate(capsys, *args: str) -> tuple[int, str, str]:
    code = validate_cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_within_budget_prints_the_table_and_exits_0(capsys, digits_export, tmp_path):
    onnx_path, root = digits_export
    report_path = tmp_path / "quality.json"
    code, _, err = run_validate(
        capsys,
        "tome_digits_vit",
        str(onnx_path),
        "--data",
        str(root),
        "--max-drop",
        "5",
        "--report",
        str(report_path),
    )
    assert code == 0, err
    assert "95% interval" in err and "accuracy_drop *" in err and "PASS: accuracy_drop" in err
    quality = json.loads(report_path.read_text())["quality"]
    assert quality["data"]["images"] == IMAGES and quality["data"]["unreadable"] == 0
    assert quality["output_kind"] == "logits" and quality["within_budget"] is True
    metrics = quality["metrics"]
    assert metrics["accuracy_drop"]["value"] <= 5 and metrics["accuracy_drop"]["count"] == IMAGES
    # the PNGs hold the digits the model was trained on: the plain model classifies them well
    assert metrics["reference_accuracy"]["value"] > 0.9
    for estimate in metrics.values():
        assert estimate["low"] <= estimate["value"] <= estimate["high"]


@pytest.mark.parametrize(
    "bound, fragment",
    [
        (["--min-agreement", "1.01"], "top1_agreement"),
        (["--max-drop", "-1"], "accuracy_drop"),
    ],
)
def test_an_impossible_bound_exits_5_naming_metric_value_and_bound(capsys, digits_export, bound, fragment):
    onnx_path, root = digits_export
    code, _, err = run_validate(capsys, "tome_digits_vit", str(onnx_path), "--data", str(root), *bound)
    assert code == 5, err
    assert_one_line_error(err, "quality budget not met", fragment, f"{bound[0]} {float(bound[1]):g}")


def test_bad_data_is_one_line_exit_2_and_writes_nothing(capsys, digits_export, tmp_path):
    onnx_path, _ = digits_export
    empty = tmp_path / "empty"
    empty.mkdir()
    report_path = tmp_path / "r.json"
    for data, fragment in [(tmp_path / "missing", "does not exist"), (empty, "holds no image files")]:
        code, out, err = run_validate(
            capsys, "tome_digits_vit", str(onnx_path), "--data", str(data), "--report", str(report_path)
        )
        assert code == 2 and out == ""
        assert_one_line_error(err, fragment)
    unreadable = tmp_path / "unreadable" / "3"
    unreadable.mkdir(parents=True)
    (unreadable / "a.png").write_bytes(b"not a png")
    code, _, err = run_validate(
        capsys, "tome_digits_vit", str(onnx_path), "--data", str(unreadable.parent), "--report", str(report_path)
    )
    assert code == 2
    assert_one_line_error(err, "none of the 1 image files", "could be decoded")
    assert not report_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "unreadable"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--max-drop", "1"], "--max-drop measures quality on your images; add --data DIR"),
        (["--data", "DIR", "--batch-sizes", "1"], "--batch-sizes belongs to the parity check"),
        (["--data", "DIR", "--metric", "cosine_mean", "--max-drop", "1"], "--max-drop bounds logits outputs"),
    ],
)
def test_flags_that_do_not_go_together(capsys, digits_export, args, fragment):
    onnx_path, root = digits_export
    args = [str(root) if a == "DIR" else a for a in args]
    code, _, err = run_validate(capsys, "tome_digits_vit", str(onnx_path), *args)
    assert code == 2
    assert_one_line_error(err, fragment)
