"""SIGTERM and SIGHUP stop every CLI as Ctrl-C does (exit 143 / 129, one `error:` line): every staged or
temporary file and folder is removed, and an earlier output stays byte-identical. A complete but unvalidated
export never survives under a temporary name."""

from __future__ import annotations

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
