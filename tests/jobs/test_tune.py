"""tome-tune on the bundled digits ViT: the search reads only calibration images, the result holds on the held-out
ones when recomputed independently, bad data and impossible budgets fail in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from conftest import assert_one_line_error
from PIL import Image

from tome_deploy.cli.export import main as export_main
from tome_deploy.cli.tune import main as tune_main
from tome_deploy.jobs.tune import tune_model
from tome_deploy.models.digits import write_digits_folder
from tome_deploy.quality.budget import Budget


def digits_folder(root: Path, per_class: int | None = None) -> Path:
    """The 360 test digits as root/<label>/<index>.png, or the first `per_class` of each label."""
    write_digits_folder(root)
    if per_class is not None:
        for folder in root.iterdir():
            for extra in sorted(folder.iterdir())[per_class:]:
                extra.unlink()
    return root


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return digits_folder(tmp_path_factory.mktemp("digits") / "data")


def pixels_of(path: Path) -> np.ndarray:
    """The model input of one digit PNG, worked out by hand: 8x8 values / 255, each pixel 4x4, 3 channels."""
    values = np.asarray(Image.open(path), dtype=np.float32) / 255.0  # [8, 8]
    big = values.repeat(4, axis=0).repeat(4, axis=1)  # [32, 32]
    return np.stack([big] * 3)  # [3, 32, 32]


@pytest.fixture(scope="module")
def tuned(digits, tmp_path_factory):
    """`tome-tune tome_digits_vit --data DIGITS --max-drop 1 -o tune.json` (the job it runs), with the folder's
    bytes from before it. The 360 test digits: 180 to search on, 180 held out."""
    before = {p.relative_to(digits): p.read_bytes() for p in digits.rglob("*.png")}
    out = tmp_path_factory.mktemp("tuned") / "tune.json"
    outcome = tune_model("tome_digits_vit", digits, out, budget=Budget(max_drop=1.0), cache=f"{out}.cache.json")
    return outcome, out, before


@pytest.mark.slow
def test_the_search_reads_no_held_out_image(tuned):
    outcome, out, _ = tuned
    held_out = {outcome.images.files[i] for i in outcome.held_out}
    calibration = {outcome.images.files[i] for i in outcome.calibration}
    assert held_out and calibration and not held_out & calibration
    assert outcome.files_read_by_search, "the search decoded nothing"
    assert set(outcome.files_read_by_search) <= calibration
    assert held_out <= set(outcome.images.loaded)  # read afterwards, to measure
    written = json.loads(out.read_text())
    assert sorted(written["held_out_files"]) == sorted(held_out)
    assert written["split_seed"] == 0
    assert (written["calibration_count"], written["held_out_count"]) == (180, 180)


@pytest.mark.slow
def test_the_data_folder_is_left_as_it_was(tuned, digits):
    _, _, before = tuned
    assert {p.relative_to(digits): p.read_bytes() for p in digits.rglob("*.png")} == before


@pytest.mark.slow
def test_the_cli_resumes_from_the_cache(tuned, digits, capsys):
    _, out, _ = tuned
    assert tune_main(["tome_digits_vit", "--data", str(digits), "--max-drop", "1", "-o", str(out)]) == 0
    measured = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  [")]
    assert measured and all(line.endswith("x measured (cached)") for line in measured)


@pytest.mark.slow
def test_max_drop_1_holds_on_the_held_out_files_recomputed_independently(tuned, digits, tmp_path):
    _, tune_json, _ = tuned
    result = json.loads(tune_json.read_text())
    chosen = result["chosen"]
    assert isinstance(chosen["r_per_layer"], list) and all(isinstance(r, int) for r in chosen["r_per_layer"])
    assert chosen["held_out"]["accuracy_drop"] <= 1.0
    assert {"top1_agreement", "accuracy", "accuracy_drop"} <= set(chosen["held_out"])
    assert len(result["candidates"]) > 10
    assert any(c["kind"] == "greedy" for c in result["candidates"])

    onnx_path = tmp_path / "tuned.onnx"
    assert export_main(["tome_digits_vit", "--schedule-from", str(tune_json), "-o", str(onnx_path)]) == 0
    files = result["held_out_files"]
    labels = np.array([int(Path(f).parent.name) for f in files])
    pixels = np.stack([pixels_of(digits / f) for f in files]).astype(np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    tome_top1 = session.run(None, {"pixel_values": pixels})[0].argmax(-1)
    plain = timm.create_model("tome_digits_vit", pretrained=True).eval()
    with torch.no_grad():
        plain_top1 = plain(torch.from_numpy(pixels)).argmax(-1).numpy()
    drop = 100.0 * ((plain_top1 == labels).mean() - (tome_top1 == labels).mean())
    assert drop <= 1.0
    assert drop == pytest.approx(chosen["held_out"]["accuracy_drop"], abs=100.0 / len(files) + 1e-9)


@pytest.mark.slow
def test_an_impossible_budget_names_the_best_trade_off_and_its_flags(tuned, digits, tmp_path, capsys):
    _, out, _ = tuned
    refused = tmp_path / "tune.json"
    code = tune_main(
        [
            "tome_digits_vit",
            "--data",
            str(digits),
            "-o",
            str(refused),
            "--max-drop",
            "0",
            "--target-speedup",
            "50",
            "--no-greedy",
            "--cache",
            f"{out}.cache.json",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_line_error(err, "no schedule fits", "best trade-off", "--schedule ")
    assert not refused.exists()


def bad_data_cases(tmp_path: Path) -> dict[str, tuple[Path, tuple[str, ...], str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = tmp_path / "unreadable" / "3"
    unreadable.mkdir(parents=True)
    for i in range(4):
        (unreadable / f"{i}.png").write_bytes(b"not a png")
    unmapped = tmp_path / "unmapped" / "cats"
    unmapped.mkdir(parents=True)
    Image.new("L", (8, 8)).save(unmapped / "a.png")
    a_file = tmp_path / "a_file.png"
    Image.new("L", (8, 8)).save(a_file)
    return {
        "empty folder": (empty, (), "empty"),
        "unreadable files": (tmp_path / "unreadable", (), "could be decoded"),
        "labels that map to no class": (tmp_path / "unmapped", (), "map"),
        "a file": (a_file, (), "is a file"),
    }


@pytest.mark.parametrize("case", ["empty folder", "unreadable files", "labels that map to no class", "a file"])
def test_bad_data_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    data, _, fragment = bad_data_cases(tmp_path)[case]
    out = tmp_path / "out" / "tune.json"
    out.parent.mkdir()
    code = tune_main(["tome_digits_vit", "--data", str(data), "--max-drop", "1", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_line_error(err)
    assert fragment in err.lower(), err
    assert list(out.parent.iterdir()) == []


def test_no_budget_and_two_budgets_are_refused(tmp_path, capsys):
    out = tmp_path / "tune.json"
    data = digits_folder(tmp_path / "digits", per_class=2)
    assert tune_main(["tome_digits_vit", "--data", str(data), "-o", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, "budget")
    assert (
        tune_main(
            [
                "tome_digits_vit",
                "--data",
                str(data),
                "-o",
                str(out),
                "--max-drop",
                "1",
                "--min-agreement",
                "0.9",
            ]
        )
        == 2
    )
    assert_one_line_error(capsys.readouterr().err, "not several")
    assert not out.exists()


@pytest.fixture(scope="module")
def flat_images(tmp_path_factory) -> Path:
    """24 unlabeled 32x32 pictures in one folder: smooth random colour fields."""
    root = tmp_path_factory.mktemp("flat")
    rng = np.random.default_rng(0)
    for i in range(24):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((32, 32), Image.Resampling.BILINEAR).save(root / f"img{i:02d}.png")
    return root


@pytest.mark.slow
def test_an_encoder_is_tuned_by_cosine_on_unlabelled_images(flat_images, tmp_path, capsys):
    from family_sources import open_clip_checkpoint

    source = open_clip_checkpoint(tmp_path / "open_clip")  # open_clip:tome-test-tiny, 65 tokens, 3 blocks
    out = tmp_path / "tune.json"
    argv = [source.name, "--checkpoint", str(source.checkpoint), "--data", str(flat_images), "-o", str(out)]
    assert tune_main([*argv, "--min-cosine", "0.5", "--no-greedy"]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert result["output_kind"] == "embedding" and result["metric"] == "cosine_mean"
    assert result["data"]["labels"] is False
    assert {"cosine_mean", "cosine_p5", "knn_recall10"} <= set(result["chosen"]["held_out"])
    assert result["chosen"]["held_out"]["cosine_mean"] >= 0.5
    capsys.readouterr()
    assert tune_main([*argv, "--max-drop", "1", "-o", str(tmp_path / "refused.json")]) == 2
    assert_one_line_error(capsys.readouterr().err, "--max-drop")
    assert not (tmp_path / "refused.json").exists()


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--max-drop", "-1", "from 0 to 100"),
        ("--min-agreement", "2", "from -1 to 1"),
        ("--min-cosine", "-3", "from -1 to 1"),
    ],
)
def test_out_of_range_bounds_are_refused_before_anything_loads(tmp_path, capsys, flag, value, fragment):
    out = tmp_path / "tune.json"
    assert tune_main(["tome_digits_vit", "--data", str(tmp_path / "none"), "-o", str(out), flag, value]) == 2
    assert_one_line_error(capsys.readouterr().err, flag, fragment)
    assert not out.exists()


@pytest.mark.slow
def test_bf16_is_measured_as_it_ships_with_the_plain_model_in_bf16_between(tmp_path, capsys):
    """tome-tune --precision bf16 --runtime openvino: every measured schedule and the plain model were written
    as bf16 IRs and measured against plain fp32; the stacking is printed and recorded."""
    data = digits_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "tune.json"
    args = ["tome_digits_vit", "--data", str(data), "-o", str(out), "--max-drop", "50", "--no-greedy"]
    # --max-minutes: one schedule is always measured, and one is enough here (each is an export).
    assert tune_main([*args, "--precision", "bf16", "--runtime", "openvino", "--max-minutes", "0.01"]) == 0
    err = capsys.readouterr().err
    assert "Stacking against plain fp32" in err and "plain bf16" in err and "ToMe bf16" in err
    record = json.loads(out.read_text())
    assert record["precision"] == "bf16" and record["runtime"] == "openvino"
    plain = record["plain_reduced"]
    assert "measured_speedup" in plain and 0 <= plain["held_out"]["top1_agreement"] <= 1


def test_bf16_tuning_in_onnx_runtime_is_refused_before_anything_loads(tmp_path, capsys):
    out = tmp_path / "tune.json"
    args = ["tome_digits_vit", "--data", str(tmp_path / "none"), "-o", str(out), "--max-drop", "1"]
    assert tune_main([*args, "--precision", "bf16"]) == 2
    assert_one_line_error(capsys.readouterr().err, "bf16 runs in OpenVINO", "--runtime openvino")
    assert not out.exists()


@pytest.mark.slow
def test_int8_in_openvino_is_calibrated_on_the_calibration_part(tmp_path, capsys):
    """tome-tune --precision int8 --runtime openvino: NNCF is static only, so every candidate and the plain
    model are quantized on images of the calibration part (never a held-out one), recorded in tune.json."""
    data = digits_folder(tmp_path / "data", per_class=2)
    out = tmp_path / "tune.json"
    args = ["tome_digits_vit", "--data", str(data), "-o", str(out), "--max-drop", "50", "--no-greedy"]
    assert tune_main([*args, "--precision", "int8", "--runtime", "openvino", "--max-minutes", "0.01"]) == 0
    assert "ToMe int8" in capsys.readouterr().err
    record = json.loads(out.read_text())
    assert record["precision"] == "int8" and record["runtime"] == "openvino"
    assert record["int8_calibration"]["count"] == record["calibration_count"] == 10  # 20 digits, half held out
    assert len(record["int8_calibration"]["data_fingerprint"]) == 64
    assert 0 <= record["plain_reduced"]["held_out"]["top1_agreement"] <= 1
