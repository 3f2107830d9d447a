"""tome-export --schedule-from tune.json: the chosen r per layer is exported and the measured quality is
recorded in the artifact; a tune.json that does not fit the model is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from tome_deploy.artifact.onnx_file import read_metadata
from tome_deploy.cli import export as export_cli
from tome_deploy.models.loading.dispatch import load_model
from tome_deploy.models.loading.fingerprint import weights_fingerprint
from tome_deploy.models.loading.source import ModelSource

MODEL = "tome_digits_vit"  # 8x8 patches + a class token = 65 tokens, 6 blocks
R_PER_LAYER = [6, 4, 4, 2, 0, 2]
HELD_OUT = {"top1_agreement": 0.985, "top5_agreement": 1.0, "mean_kl": 0.012, "accuracy": 0.97, "accuracy_drop": 0.6}


@pytest.fixture(scope="module")
def digits_sha256() -> str:
    return weights_fingerprint(load_model(ModelSource(MODEL)).model)


def write_tune(path: Path, weights_sha256: str, r_per_layer: list[int] = R_PER_LAYER) -> Path:
    """A tune.json as tome-tune writes it for the bundled digits ViT (the keys an export reads, and a few more)."""
    chosen = {"label": "greedy", "kind": "greedy", "r_per_layer": r_per_layer, "held_out": HELD_OUT}
    values = {
        "tool_version": "0.1.0",
        "model": MODEL,
        "weights_sha256": weights_sha256,
        "output_kind": "logits",
        "data": {"fingerprint": "0f" * 32, "images": 1797, "unreadable": 0, "labels": True},
        "held_out_count": 899,
        "metric": "accuracy_drop",
        "chosen": chosen,
        "candidates": [chosen],
    }
    path.write_text(json.dumps(values))
    return path


def run_export(capsys, *args: str) -> tuple[int, str]:
    code = export_cli.main(list(args))
    return code, capsys.readouterr().err


def test_exports_the_chosen_schedule_and_records_the_quality(capsys, tmp_path, digits_sha256):
    tune = write_tune(tmp_path / "tune.json", digits_sha256)
    code, err = run_export(capsys, MODEL, "--schedule-from", str(tune), "-o", str(tmp_path / "x.onnx"))
    assert code == 0, err
    assert "PASS" in err and "held-out accuracy_drop 0.6 on 899 images" in err
    meta = read_metadata(tmp_path / "x.onnx")
    assert meta.r_requested == [6, 4, 4, 2, 0, 2] and meta.r_effective == [6, 4, 4, 2, 0, 2]
    assert meta.tokens_per_layer == [65, 59, 55, 51, 49, 49, 47]
    assert meta.quality == {
        "metric": "accuracy_drop",
        "value": 0.6,
        "count": 899,
        "data_fingerprint": "0f" * 32,
        "metrics": HELD_OUT,
    }


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--r", "4"], ["--schedule-from", "drop --r"]),
        (["--schedule", "1,1,1,1,1,1"], ["--schedule-from", "drop --schedule"]),
        (["--r-inflect", "-1"], ["--schedule-from", "drop --r-inflect"]),
        (["--target-speedup", "1.2"], ["--schedule-from", "drop --target-speedup"]),
    ],
)
def test_another_schedule_option_is_refused(capsys, tmp_path, digits_sha256, extra, fragments):
    tune = write_tune(tmp_path / "tune.json", digits_sha256)
    code, err = run_export(capsys, MODEL, "--schedule-from", str(tune), *extra, "-o", str(tmp_path / "x.onnx"))
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert not (tmp_path / "x.onnx").exists()


def test_a_tune_file_for_other_weights_is_refused(capsys, tmp_path):
    tune = write_tune(tmp_path / "tune.json", "cd" * 32)
    code, err = run_export(capsys, MODEL, "--schedule-from", str(tune), "-o", str(tmp_path / "x.onnx"))
    assert code == 2
    assert_one_line_error(err, str(tune.resolve()), "tuned for other weights", "re-run tome-tune", "--checkpoint")
    assert not (tmp_path / "x.onnx").exists()


def test_a_schedule_for_another_depth_is_refused(capsys, tmp_path, digits_sha256):
    tune = write_tune(tmp_path / "tune.json", digits_sha256, r_per_layer=[4] * 12)
    code, err = run_export(capsys, MODEL, "--schedule-from", str(tune), "-o", str(tmp_path / "x.onnx"))
    assert code == 2
    assert_one_line_error(err, "chosen.r_per_layer has 12 entries", f"{MODEL} has 6 blocks")
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize(
    "content, fragments",
    [
        (None, ["no such file", "tune.json"]),
        ('{"chosen": {"r_per_layer": [4, 4', ["not JSON", "re-run tome-tune"]),
        ('{"chosen": {"r_per_layer": [4, 4, 4, 4, 4, "4"]}}', ["chosen.r_per_layer entry 5", "re-run tome-tune"]),
    ],
    ids=["missing", "truncated", "damaged"],
)
def test_a_missing_or_damaged_tune_file_is_refused(capsys, tmp_path, content, fragments):
    tune = tmp_path / "tune.json"
    if content is not None:
        tune.write_text(content)
    code, err = run_export(capsys, MODEL, "--schedule-from", str(tune), "-o", str(tmp_path / "x.onnx"))
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert not (tmp_path / "x.onnx").exists()


def test_the_output_may_not_overwrite_the_tune_file(capsys, tmp_path, digits_sha256):
    tune = write_tune(tmp_path / "tune.json", digits_sha256)
    code, err = run_export(capsys, MODEL, "--schedule-from", str(tune), "-o", str(tune))
    assert code == 2
    assert_one_line_error(err, "is also an input of this command")
    assert json.loads(tune.read_text())["chosen"]["r_per_layer"] == R_PER_LAYER
