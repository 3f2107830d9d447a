"""The cases that were "unclear" (docs/reliability.md, "Decisions"), each decided as bad input: one `error:` line,
exit 2, no traceback, every file in the working folder unchanged and nothing new written.

- a parity tolerance that can only fail (NaN, negative, infinite);
- a zero or NaN std in the model's own preprocessing (a pickled timm module's pretrained_cfg): the export
  reads its metadata back with the served reader before writing;
- an empty `--schedule` or an empty entry in it;
- a named pipe (FIFO) given for any input file: refused at once, never waited on."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image

from tome_deploy.cli import deploy as deploy_cli
from tome_deploy.cli import export as export_cli
from tome_deploy.cli import serve as serve_cli
from tome_deploy.cli import tune as tune_cli
from tome_deploy.cli import validate as validate_cli
from tome_deploy.cli import visualize as visualize_cli


def folder_state(folder: Path) -> dict[str, str]:
    """Every entry under `folder` -> its sha256 (regular files), or what it is."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_fifo():
            state[str(path.relative_to(folder))] = "fifo"
        elif path.is_dir():
            state[str(path.relative_to(folder))] = "dir"
        else:
            state[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def refused(command: Callable[[list[str]], int], argv: list[str], folder: Path, capsys, *fragments: str) -> None:
    """`command(argv)` exits 2 with one `error:` line holding every fragment, within 60 s, and leaves `folder`
    as it was. A command that waits on a FIFO is released by opening the FIFO for writing, then fails."""
    before = folder_state(folder)
    codes: list[int] = []
    worker = threading.Thread(target=lambda: codes.append(command(argv)), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():
        for fifo in folder.rglob("*"):
            if fifo.is_fifo():
                with open(fifo, "wb"):
                    pass  # the reader gets end of file and stops waiting
        worker.join(60)
        pytest.fail(f"{argv} waited on a FIFO")
    assert codes == [2], capsys.readouterr().err
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert folder_state(folder) == before


@pytest.fixture
def exported(tmp_path) -> Path:
    """Where an ONNX export would be: every case here is refused before the file is read."""
    path = tmp_path / "vit.onnx"
    path.write_bytes(b"never read")
    return path


@pytest.mark.parametrize(
    "flag, value",
    [("--atol", "nan"), ("--atol", "-1"), ("--rtol", "inf"), ("--rtol", "-0.5")],
)
def test_a_tolerance_that_can_only_fail_is_bad_input(tmp_path, capsys, exported, flag, value):
    """NaN makes every comparison false and a negative bound cannot hold: a "parity failed" (exit 1) would say
    nothing about the export, so both commands refuse it before any model loads."""
    out = tmp_path / "out.onnx"
    refused(export_cli.main, ["test_vit", "-o", str(out), flag, value], tmp_path, capsys, flag, "finite number >= 0")
    refused(validate_cli.main, ["test_vit", str(exported), flag, value], tmp_path, capsys, flag, "finite number >= 0")


@pytest.mark.parametrize("value", [(0.0, 0.0, 0.0), (float("nan"),) * 3], ids=["zero", "nan"])
def test_a_zero_or_nan_std_in_the_models_preprocessing_is_bad_input(tmp_path, capsys, value):
    """A torch.save()d timm module carries its pretrained_cfg: a std of 0 or NaN would divide every pixel by
    it. The export reads its metadata back with the reader tome-serve uses before writing (exit 2, not 1)."""
    import timm

    model = timm.create_model("test_vit", pretrained=False).eval()
    model.pretrained_cfg = dict(model.pretrained_cfg, std=value)
    torch.save(model, tmp_path / "module.pt")
    argv = [str(tmp_path / "module.pt"), "-o", str(tmp_path / "out.onnx"), "--r", "2"]
    refused(export_cli.main, argv, tmp_path, capsys, "metadata that tome-serve refuses", "'std'")


@pytest.mark.parametrize("schedule", ["", ",", " , ", "4,,4"])
def test_an_empty_schedule_or_entry_is_refused_with_the_way_to_ask_for_r_0(tmp_path, capsys, schedule):
    """`--schedule ''` exported r=0 silently and `4,,4` shifted the later layers by one; r=0 is `--r 0`."""
    argv = ["test_vit", "--schedule", schedule, "-o", str(tmp_path / "out.onnx")]
    refused(export_cli.main, argv, tmp_path, capsys, "--schedule must be comma-separated integers", "--r 0")


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _digits(root: Path) -> Path:
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        for index in range(2):
            Image.new("RGB", (8, 8), (index * 90, 0, 0)).save(root / label / f"{index}.png")
    return root


def _visualize(tmp: Path, exported: Path) -> tuple[Callable, list[str], tuple[str, ...]]:
    image = _fifo(tmp / "image.png")
    return visualize_cli.main, ["test_vit", str(image), "-o", str(tmp / "out.png")], ("image", "FIFO")


def _serve(tmp: Path, exported: Path) -> tuple[Callable, list[str], tuple[str, ...]]:
    return serve_cli.main, [str(_fifo(tmp / "model.onnx")), "--port", "0"], ("artifact", "FIFO")


def _triton(tmp: Path, exported: Path) -> tuple[Callable, list[str], tuple[str, ...]]:
    argv = ["triton-repo", str(_fifo(tmp / "model.onnx")), str(tmp / "repo")]
    return deploy_cli.main, argv, ("FIFO",)


def _validate(tmp: Path, exported: Path) -> tuple[Callable, list[str], tuple[str, ...]]:
    return validate_cli.main, ["test_vit", str(_fifo(tmp / "model.onnx"))], ("ONNX file", "FIFO")


def _checkpoint(tmp: Path, exported: Path) -> tuple[Callable, list[str], tuple[str, ...]]:
    argv = ["test_vit", "--checkpoint", str(_fifo(tmp / "w.safetensors")), "-o", str(tmp / "out.onnx")]
    return export_cli.main, argv, ("checkpoint", "FIFO")


def _schedule_from(tmp: Path, exported: Path) -> tuple[Callable, list[str], tuple[str, ...]]:
    argv = ["test_vit", "--schedule-from", str(_fifo(tmp / "tune.json")), "-o", str(tmp / "out.onnx")]
    return export_cli.main, argv, ("tune.json",)


def _data_image(tmp: Path, exported: Path) -> tuple[Callable, list[str], tuple[str, ...]]:
    data = _digits(tmp / "data")
    _fifo(data / "1" / "2.png")
    return validate_cli.main, ["test_vit", str(exported), "--data", str(data)], ("image", "2.png", "FIFO")


def _data_labels(tmp: Path, exported: Path) -> tuple[Callable, list[str], tuple[str, ...]]:
    data = _digits(tmp / "data")
    argv = ["test_vit", "--data", str(data), "--labels", str(_fifo(tmp / "labels.txt")), "-o", str(tmp / "t.json")]
    return tune_cli.main, [*argv, "--max-drop", "1"], ("--labels", "FIFO")


def _processor_config(tmp: Path, exported: Path) -> tuple[Callable, list[str], tuple[str, ...]]:
    from family_sources import hf_vit_folder

    folder = tmp / "vit"
    hf_vit_folder(folder)
    _fifo(folder / "preprocessor_config.json")
    return export_cli.main, [str(folder), "-o", str(tmp / "out.onnx")], ("preprocessor_config.json", "FIFO")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes need mkfifo (POSIX)")
@pytest.mark.parametrize(
    "make",
    [
        _visualize,
        _serve,
        _triton,
        _validate,
        _checkpoint,
        _schedule_from,
        _data_image,
        _data_labels,
        _processor_config,
    ],
    ids=lambda make: make.__name__.strip("_").replace("_", "-"),
)
def test_a_named_pipe_given_as_any_input_file_is_refused_at_once(tmp_path, capsys, exported, make):
    """Every file a command reads goes through one policy (tome_deploy/input_files.py): a FIFO is refused
    when it is opened (without blocking), never waited on; tome-visualize on one used to wait forever."""
    command, argv, fragments = make(tmp_path, exported)
    refused(command, argv, tmp_path, capsys, *fragments)
