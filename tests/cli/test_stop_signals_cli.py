"""SIGTERM and SIGHUP stop every CLI as Ctrl-C does (exit 143 / 129, one `error:` line): every staged or
temporary file and folder is removed, and an earlier output stays byte-identical. A complete but unvalidated
export never survives under a temporary name."""

from __future__ import annotations

import getpass
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error

from tome_deploy.cli import common
from tome_deploy.cli import deploy as deploy_cli
from tome_deploy.cli import export as export_cli

SIGNALS = [signal.SIGTERM, signal.SIGHUP]


def folder_state(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> its sha256; folders as 'dir'."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".old." in p.name]


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_during_validation_leaves_no_unvalidated_export(capsys, tmp_path, monkeypatch, signum):
    """The signal arrives once the ONNX file is written in its staging folder, before its validation."""
    import tome_deploy.jobs.export as export_job

    validate_runners = export_job.validate_runners

    def stopped_while_validating(*args, **kwargs):
        assert [p for p in tmp_path.glob(".out.onnx.*.tmp/out.onnx") if p.stat().st_size > 0]  # the export, staged
        os.kill(os.getpid(), signum)
        return validate_runners(*args, **kwargs)

    monkeypatch.setattr(export_job, "validate_runners", stopped_while_validating)
    out = tmp_path / "out.onnx"
    out.write_bytes(b"an earlier export")
    before = folder_state(tmp_path)
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    assert export_cli.main(["test_vit", "--r", "8", "-o", str(out)]) == 128 + signum
    assert_one_line_error(capsys.readouterr().err, f"stopped by {signal.Signals(signum).name}")
    assert folder_state(tmp_path) == before and not temporaries(tmp_path)
    assert {s: signal.getsignal(s) for s in SIGNALS} == handlers  # restored after the command


@pytest.mark.parametrize("signum", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_while_copying_keeps_the_triton_repository(capsys, tmp_path, monkeypatch, export_cached, signum):
    """`tome-deploy triton-repo --overwrite`, stopped while the model file is copied into the staging folder:
    the staging folder and its `.model.onnx.XXXX.tmp` are removed and the earlier model is untouched."""
    from tome_deploy.serving import triton_repo

    onnx = export_cached("vit_class_token").path
    repo = tmp_path / "repo"
    assert deploy_cli.main(["triton-repo", str(onnx), str(repo), "--name", "m"]) == 0
    (repo / "m" / "README.md").write_text("edited by hand\n")
    copy = triton_repo._copy

    def stopped_while_copying(source, out):
        out.write(b"half a model")
        out.flush()
        assert temporaries(repo)  # .m.XXXX.tmp/1/.model.onnx.XXXX.tmp
        os.kill(os.getpid(), signum)
        copy(source, out)

    monkeypatch.setattr(triton_repo, "_copy", stopped_while_copying)
    capsys.readouterr()
    before = folder_state(tmp_path)
    argv = ["triton-repo", str(onnx), str(repo), "--name", "m", "--overwrite"]
    assert deploy_cli.main(argv) == 128 + signum
    assert_one_line_error(capsys.readouterr().err, f"stopped by {signal.Signals(signum).name}")
    assert folder_state(tmp_path) == before and not temporaries(tmp_path)


def test_a_stop_signal_while_swapping_puts_the_previous_triton_model_back(capsys, tmp_path, monkeypatch, export_cached):
    """Stopped between moving the old model folder aside and renaming the new one in: the old one comes back."""
    from tome_deploy.serving import triton_repo

    onnx = export_cached("vit_class_token").path
    repo = tmp_path / "repo"
    assert deploy_cli.main(["triton-repo", str(onnx), str(repo), "--name", "m"]) == 0
    (repo / "m" / "README.md").write_text("edited by hand\n")
    replace = os.replace
    calls = []

    def stopped_after_first_rename(source, target):
        replace(source, target)
        if ".old." in str(target) and not calls:  # the old model folder, just moved aside
            calls.append(target)
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(triton_repo.os, "replace", stopped_after_first_rename)
    capsys.readouterr()
    before = folder_state(tmp_path)
    assert deploy_cli.main(["triton-repo", str(onnx), str(repo), "--name", "m", "--overwrite"]) == 143
    assert_one_line_error(capsys.readouterr().err, "stopped by SIGTERM")
    assert calls and folder_state(tmp_path) == before and not temporaries(tmp_path)


def test_an_ignored_stop_signal_stays_ignored(monkeypatch):
    """Under nohup (SIGHUP ignored) the command keeps running, as it did before."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:

        def hung_up() -> int:
            os.kill(os.getpid(), signal.SIGHUP)
            return 0

        assert common.run_command(hung_up) == 0
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


@pytest.mark.parametrize(
    "signum, moment",
    [(signal.SIGTERM, "written"), (signal.SIGHUP, "staged")],
    ids=["SIGTERM-after-the-export-is-written", "SIGHUP-once-the-staged-file-exists"],
)
def test_a_real_tome_export_process_stopped_by_a_signal(tmp_path, signum, moment):
    """A real `tome-export` process: poll until its staging folder `.out.onnx.*.tmp` appears next to -o
    (`written`: once it holds the export), then send the signal; nothing temporary remains and the earlier
    -o file is byte-identical."""
    out = tmp_path / "out.onnx"
    out.write_bytes(b"an earlier export")
    before = folder_state(tmp_path)
    process = subprocess.Popen(
        [sys.executable, "-m", "tome_deploy.cli.export", "test_vit", "--r", "8", "-o", str(out)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            pattern = ".out.onnx.*.tmp" if moment == "staged" else ".out.onnx.*.tmp/out.onnx"
            staged = [p for p in tmp_path.glob(pattern) if moment == "staged" or _size(p) > 0]
            if staged:
                process.send_signal(signum)
                break
            time.sleep(0.002)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, err
    assert_one_line_error(err, f"stopped by {signal.Signals(signum).name}")
    assert folder_state(tmp_path) == before and not temporaries(tmp_path)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    """(an image folder of 4 test digits per class, tome-export tome_digits_vit --r 3 of it), made once."""
    from tome_deploy.models.digits import write_digits_folder

    root = tmp_path_factory.mktemp("digits")
    data = root / "data"
    write_digits_folder(data)
    for folder in data.iterdir():
        for extra in sorted(folder.iterdir())[4:]:
            extra.unlink()
    onnx = root / "digits.onnx"
    assert export_cli.main(["tome_digits_vit", "--r", "3", "-o", str(onnx), "--no-validate", "--quiet"]) == 0
    return data, onnx


@pytest.mark.slow
@pytest.mark.parametrize(
    "command, signum",
    [("export", signal.SIGTERM), ("validate", signal.SIGHUP)],
    ids=["tome-export--measure", "tome-validate--data"],
)
def test_a_stop_signal_leaves_nothing_in_the_temporary_folder(capsys, tmp_path, monkeypatch, digits, command, signum):
    """A command that makes a temporary folder under TMPDIR (the plain export it times or compares against)
    is stopped right after a file was written there: the folder is removed with everything in it, and nothing
    temporary is left next to the outputs. (ONNX Runtime's `.ses` file and torch's `torchinductor_<user>`
    cache folder are theirs: every run leaves them, a finished one too, and they hold no export.)
    tome-tune's folder is the same `with` block (test_every_temporary_is_removed_by_construction); signalling
    it for real would first run its search, minutes on this machine."""
    import tempfile

    import tome_deploy.jobs.export as export_job
    import tome_deploy.jobs.validate as validate_job
    from tome_deploy.cli import validate as validate_cli

    data, onnx = digits
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    module, name = {
        "export": (export_job, "unmerged_export"),
        "validate": (validate_job, "export_plain"),
    }[command]
    written = getattr(module, name)

    def stopped_after_writing(*args, **kwargs):
        result = written(*args, **kwargs)
        assert [p for p in scratch.rglob("*") if p.is_file()]  # the temporary folder holds the plain export
        os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(module, name, stopped_after_writing)
    out = tmp_path / "out"
    main, argv = {
        "export": (export_cli.main, ["tome_digits_vit", "--r", "3", "-o", str(out), "--measure", "--no-validate"]),
        "validate": (validate_cli.main, ["tome_digits_vit", str(onnx), "--data", str(data)]),
    }[command]
    assert main(argv) == 128 + signum
    assert_one_line_error(capsys.readouterr().err, f"stopped by {signal.Signals(signum).name}")
    libraries = {".ses", f"torchinductor_{getpass.getuser()}"}
    assert [p.name for p in scratch.iterdir() if p.name not in libraries] == []
    assert not list(scratch.rglob("*.onnx")) and not temporaries(tmp_path)


def test_every_temporary_is_removed_by_construction():
    """The source of every command: a TemporaryDirectory is only ever opened as a `with` block (removed however
    the block ends, a stop signal included), and the other temporaries (mkdtemp, mkstemp) are made only by
    output_files.py, which registers each for removal on the way out."""
    import ast

    import tome_deploy

    package = Path(tome_deploy.__file__).parent
    misplaced = []
    for source in sorted(package.rglob("*.py")):
        tree = ast.parse(source.read_text())
        in_with = {
            id(item.context_expr) for node in ast.walk(tree) if isinstance(node, ast.With) for item in node.items
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name, where = node.func.attr, f"{source.relative_to(package)}:{node.lineno}"
                if name == "TemporaryDirectory" and id(node) not in in_with:
                    misplaced.append(where)
                if name in ("mkdtemp", "mkstemp", "NamedTemporaryFile") and source.name != "output_files.py":
                    misplaced.append(where)
    assert misplaced == []
