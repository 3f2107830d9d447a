"""Files a hostile or careless user hands over: a model folder that asks to run its own code, and output paths
that name a device node, a FIFO or a socket. Each is refused in one line (exit 2) and nothing runs or changes."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from tome_deploy.cli import export as export_cli


def custom_code_folder(folder: Path, marker: Path, *, model_type: str) -> Path:
    """A save_pretrained-like folder whose config.json points at its own Python, which would write `marker`."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": model_type,
                "architectures": ["ViTForImageClassification"],
                "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"},
                "hidden_size": 32,
            }
        )
    )
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder


@pytest.mark.parametrize("model_type", ["evil_custom", "vit"])
def test_a_folder_that_asks_to_run_its_own_code_is_refused_whatever_stdin_says(tmp_path, model_type):
    marker = tmp_path / "the_folder_code_ran"
    folder = custom_code_folder(tmp_path / "model", marker, model_type=model_type)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    result = subprocess.run(
        ["tome-export", str(folder), "-o", str(tmp_path / "out.onnx"), "--no-validate"],
        input="y\ny\ny\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result.stderr, "auto_map")
    assert result.stdout == ""  # no prompt
    assert not marker.exists()
    assert not (tmp_path / "out.onnx").exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def special_files(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a socket and (as root) a character device node, made in tmp_path."""
    made = {"fifo": tmp_path / "a_fifo"}
    os.mkfifo(made["fifo"])
    made["socket"] = tmp_path / "a_socket"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(made["socket"]))
    server.close()
    if os.geteuid() == 0:
        made["device"] = tmp_path / "a_null_device"
        os.mknod(made["device"], 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    return made


@pytest.mark.parametrize("kind", ["fifo", "socket", "device"])
@pytest.mark.parametrize("flag", ["-o", "--report"])
def test_an_output_that_is_not_a_regular_file_is_never_replaced(tmp_path, capsys, kind, flag):
    made = special_files(tmp_path)
    if kind not in made:
        pytest.skip("a device node can only be made as root")
    target = made[kind]
    mode = target.lstat().st_mode
    argv = ["test_vit", "--no-validate", "-o", str(tmp_path / "x.onnx"), "--report", str(tmp_path / "r.json")]
    argv[argv.index(flag) + 1] = str(target)
    code = export_cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert_one_line_error(err, "never replaces")
    assert target.lstat().st_mode == mode  # still the FIFO, socket or device it was
    assert not (tmp_path / "x.onnx").exists()


def test_a_symlink_to_a_device_is_not_followed_into_a_replacement(tmp_path, capsys):
    link = tmp_path / "link.onnx"
    link.symlink_to("/dev/null")
    code = export_cli.main(["test_vit", "--no-validate", "-o", str(link)])
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "never replaces")
    assert link.is_symlink() and stat.S_ISCHR(Path("/dev/null").stat().st_mode)
