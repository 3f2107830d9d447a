"""Hugging Face save_pretrained folders edited to lie (issue: HF folders trusted too far): a config whose sizes
do not match the weights file, weights missing or extra, and a preprocessor_config.json with bad values. Each is
one `error:` line naming the file and key, exit 2, no traceback, and nothing is built first."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_one_line_error
from family_sources import hf_vit_folder
from safetensors.torch import load_file, save_file

from tome_deploy.cli import export as export_cli


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "vit"
    hf_vit_folder(folder)
    return folder


@pytest.fixture
def folder(pristine, tmp_path) -> Path:
    copy = tmp_path / "vit"
    copy.mkdir()
    for file in pristine.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    return copy


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(changes)
    path.write_text(json.dumps(data))


def export(folder: Path, tmp_path: Path) -> int:
    return export_cli.main([str(folder), "-o", str(tmp_path / "out.onnx"), "--r", "1"])


def test_config_asking_for_100000_layers_is_refused_before_building(folder, tmp_path, capsys):
    edit_json(folder / "config.json", num_hidden_layers=100_000)
    started = time.monotonic()
    assert export(folder, tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, "'num_hidden_layers' is 100000", "3 layers")
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out.onnx").exists()


def test_config_width_that_does_not_match_the_weights_is_refused(folder, tmp_path, capsys):
    edit_json(folder / "config.json", hidden_size=1_000_000)
    assert export(folder, tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, "does not match the weights", "hidden_size 1000000")


def test_weights_missing_a_layer_are_refused(folder, tmp_path, capsys):
    weights = load_file(str(folder / "model.safetensors"))
    dropped = sorted(name for name in weights if ".layer.2." in name)
    save_file({k: v for k, v in weights.items() if k not in dropped}, str(folder / "model.safetensors"))
    edit_json(folder / "config.json", num_hidden_layers=3)
    assert export(folder, tmp_path) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err, "'num_hidden_layers' is 3 but the weights hold 2 layers")


def test_weights_missing_one_tensor_are_refused(folder, tmp_path, capsys):
    weights = load_file(str(folder / "model.safetensors"))
    del weights["vit.encoder.layer.1.output.dense.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    assert export(folder, tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, "missing 1", "vit.encoder.layer.1.output.dense.weight")


def test_unexpected_and_misshaped_weights_are_refused(folder, tmp_path, capsys):
    weights = load_file(str(folder / "model.safetensors"))
    weights["extra.weight"] = torch.zeros(2)
    save_file(weights, str(folder / "model.safetensors"))
    assert export(folder, tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, "1 unexpected (extra.weight)")
    weights.pop("extra.weight")
    weights["classifier.bias"] = torch.zeros(7)
    save_file(weights, str(folder / "model.safetensors"))
    assert export(folder, tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, "classifier.bias is [7]", "num_labels 10")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"image_mean": [0.5, 0.5]}, "'image_mean'"),
        ({"image_std": [0.5, 0.0, 0.5]}, "'image_std'"),
        ({"image_std": "x"}, "'image_std'"),
        ({"size": {"height": -3, "width": 32}}, "'size'"),
        ({"size": "big"}, "'size'"),
        ({"do_center_crop": True, "size": 32, "crop_size": 64}, "'crop_size'"),
        ({"resample": 99}, "'resample'"),
        ({"do_center_crop": "yes"}, "'do_center_crop'"),
    ],
    ids=["mean-2", "std-zero", "std-text", "size-negative", "size-text", "crop-over-size", "resample", "flag-text"],
)
def test_bad_preprocessor_config_values_are_one_line(folder, tmp_path, capsys, changes, fragment):
    edit_json(folder / "preprocessor_config.json", **changes)
    assert export(folder, tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, "preprocessor_config.json", fragment)


@pytest.mark.parametrize("text", ["[1, 2]", "{not json", "[" * 100_000])
def test_preprocessor_config_not_an_object_is_one_line(folder, tmp_path, capsys, text):
    (folder / "preprocessor_config.json").write_text(text)
    assert export(folder, tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, "preprocessor_config.json")


def test_huge_preprocessor_config_is_refused_unread(folder, tmp_path, capsys):
    with open(folder / "preprocessor_config.json", "wb") as stream:
        stream.truncate(2 << 20)  # sparse: 2 MiB of nothing
    assert export(folder, tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, "preprocessor_config.json is over 1 MiB")


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"image_std": [0.5, 1e-9, 0.5]}, "'std'"),
        ({"image_mean": [1e6, 0.5, 0.5]}, "'mean'"),
        ({"do_center_crop": True, "size": 64, "crop_size": 8}, "'crop_pct'"),
    ],
    ids=["std-1e-9", "mean-1e6", "crop-pct-0.125"],
)
def test_preprocessing_that_the_served_reader_refuses_is_refused_before_writing(
    folder, tmp_path, capsys, changes, fragment
):
    """Values preprocessor_config.json's own checks let through (positive, finite, crop within size) but that
    the reader tome-serve uses refuses: the export reads its metadata back first, so nothing is written."""
    edit_json(folder / "preprocessor_config.json", **changes)
    before = folder_hashes(folder)
    assert export(folder, tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, "metadata that tome-serve refuses", fragment)
    assert folder_hashes(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vit"]  # no out.onnx, no temporary


def test_untouched_folder_still_exports(folder, tmp_path):
    assert export(folder, tmp_path) == 0


REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(pristine, tmp_path, monkeypatch) -> Path:
    """The Hugging Face hub cache as `snapshot_download` leaves it for `hf:tome/tiny-vit` (refs/main -> a
    snapshot folder holding the tiny folder's files), with the hub offline (HF_HUB_OFFLINE=1, as a user without
    a network sets it): `hf:` models are read from here. Returns the snapshot folder, to edit."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / "models--tome--tiny-vit"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    for file in pristine.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return snapshot


def export_hub(name: str, tmp_path: Path) -> int:
    return export_cli.main([name, "--pretrained", "-o", str(tmp_path / "out.onnx"), "--r", "1", "--no-validate"])


def test_a_hub_model_is_read_from_its_snapshot_folder(hub_cache, tmp_path, capsys):
    assert export_hub("hf:tome/tiny-vit", tmp_path) == 0
    assert (tmp_path / "out.onnx").is_file()


def test_a_hub_model_not_in_the_cache_is_one_line(hub_cache, tmp_path, capsys):
    assert export_hub("hf:tome/absent", tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, "tome/absent", "not in the local cache")


@pytest.mark.parametrize("edit", ["auto_map", "missing-tensor", "layers", "std-1e-9"])
def test_a_hub_model_is_checked_against_its_weights_as_a_folder_is(hub_cache, tmp_path, capsys, edit):
    """The hub's files go through the folder's checks: no code of its own, weights that fit the config, a
    preprocessing the served reader accepts; nothing is written and the cached files are unchanged."""
    if edit == "auto_map":
        edit_json(hub_cache / "config.json", auto_map={"AutoConfig": "mine.MyConfig"})
        fragment = "'auto_map'"
    elif edit == "missing-tensor":
        weights = load_file(str(hub_cache / "model.safetensors"))
        del weights["vit.encoder.layer.1.output.dense.weight"]
        save_file(weights, str(hub_cache / "model.safetensors"))
        fragment = "vit.encoder.layer.1.output.dense.weight"
    elif edit == "layers":
        edit_json(hub_cache / "config.json", num_hidden_layers=100_000)
        fragment = "'num_hidden_layers' is 100000"
    else:
        edit_json(hub_cache / "preprocessor_config.json", image_std=[0.5, 1e-9, 0.5])
        fragment = "'std'"
    before = folder_hashes(hub_cache)
    assert export_hub("hf:tome/tiny-vit", tmp_path) == 2
    assert_one_line_error(capsys.readouterr().err, fragment)
    assert folder_hashes(hub_cache) == before and not (tmp_path / "out.onnx").exists()
