"""Hostile and careless use of every CLI (tome-serve has its own file): each case asserts the exit code, a
single `error:` line, no traceback, and that every input and pre-existing output is byte-for-byte unchanged
(sha256 before and after) with no stray file left in the working folder.

The CLIs run in-process (`main(argv)`), on the tiny timm `test_vit`, so the whole file takes seconds per case."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from conftest import assert_one_line_error
from PIL import Image
from safetensors.torch import save_file

from tome_deploy.cli import build as build_cli
from tome_deploy.cli import common
from tome_deploy.cli import deploy as deploy_cli
from tome_deploy.cli import export as export_cli
from tome_deploy.cli import serve as serve_cli
from tome_deploy.cli import validate as validate_cli
from tome_deploy.cli import visualize as visualize_cli
from tome_deploy.models.loading.fingerprint import weights_fingerprint

COMMANDS = {
    "export": export_cli,
    "validate": validate_cli,
    "build": build_cli,
    "deploy": deploy_cli,
    "visualize": visualize_cli,
    "serve": serve_cli,
}


class Bomb:
    """Pickles as a call of nn.Linear(16384, 16384): 1.1 GB allocated by the constructor if it ever runs."""

    def __reduce__(self):
        return (torch.nn.Linear, (16384, 16384))


class RunsCode:
    """Pickles as a call of os.system: must never run without --trust-pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_state(folder: Path) -> dict[str, str]:
    """Every file under `folder` (recursively) -> its sha256; directories as 'dir'."""
    state = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            state[str(path.relative_to(folder))] = "link:" + os.readlink(path)
        elif path.is_dir():
            state[str(path.relative_to(folder))] = "dir"
        else:
            state[str(path.relative_to(folder))] = sha256(path)
    return state


def read_only_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create files in (root ignores mode bits: /sys refuses new files to it)."""
    folder = tmp_path / "read_only"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o555)
    try:
        (folder / ".probe").touch()
    except OSError:
        return folder
    (folder / ".probe").unlink()
    return Path("/sys")


def flip_bytes(data: bytes, start: int, count: int) -> bytes:
    out = bytearray(data)
    for i in range(start, start + count):
        out[i] ^= 0xFF
    return bytes(out)


def engine_sidecar(plan: Path, backend: str, tome: dict | None, plan_bytes: bytes) -> dict:
    """A tome-build sidecar for `plan` (see artifact/sidecar.py), written independently here."""
    return {
        "backend": backend,
        "backend_version": "10.0",
        "compute_capabilities": ["89"],
        "profiles": [{"input_name": "pixel_values", "min": 1, "opt": 4, "max": 8}],
        "precision": "fp32",
        "input_name": "pixel_values",
        "output_name": "logits",
        "input_shape": [3, 160, 160],
        "output_shape": [1000],
        "onnx_path": str(plan.with_suffix(".onnx")),
        "onnx_sha256": "0" * 64,
        "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        "plan_bytes": len(plan_bytes),
        "tool_version": "0.1.0",
        "tome": tome,
        "warnings": [],
        "format": 1,
    }


@dataclass
class Files:
    """The files the cases use, made once per module in `root`."""

    root: Path
    onnx: Path = None  # tome-export of test_vit r=8 (seed 0)
    ckpt: Path = None  # torch.save zip state dict of test_vit seed 0, with an 'arch' key
    extra: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> Path:
        return self.extra[name]


@pytest.fixture(scope="module")
def files(tmp_path_factory, export_cached) -> Files:
    root = tmp_path_factory.mktemp("reliability")
    made = Files(root)
    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()  # what `tome-export test_vit` builds (seed 0)
    # The session's test_vit export, copied here (so the hashes cover it) and labelled with these weights.
    proto = onnx.load(str(export_cached("vit_class_token").path))
    for prop in proto.metadata_props:
        if prop.key == "tome.weights_sha256":
            prop.value = json.dumps(weights_fingerprint(model))
    made.onnx = root / "model.onnx"
    onnx.save(proto, str(made.onnx))
    made.ckpt = root / "ckpt.pt"
    torch.save({"arch": "test_vit", "state_dict": model.state_dict()}, made.ckpt)
    data = made.ckpt.read_bytes()
    extra = made.extra

    def write(name: str, content: bytes) -> None:
        extra[name] = root / name
        extra[name].write_bytes(content)

    write("crc.pt", flip_bytes(data, len(data) // 2, 2000))  # inside the largest tensor's record
    write("truncated.pt", data[: len(data) // 2])
    write("empty.pt", b"")
    write("random.pt", np.random.default_rng(0).bytes(4096))
    save_file(model.state_dict(), str(root / "good.safetensors"), metadata={"arch": "test_vit"})
    good = (root / "good.safetensors").read_bytes()
    write("truncated.safetensors", good[: len(good) // 3])
    write("bad_header.safetensors", len(b"{not json!").to_bytes(8, "little") + b"{not json!" + good[-64:])
    write("lying_header.safetensors", (len(good) * 10).to_bytes(8, "little") + good[8:])
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(root / "scripted.pt"))
    extra["scripted.pt"] = root / "scripted.pt"
    torch.save({"model": Bomb()}, root / "bomb.pt")
    extra["bomb.pt"] = root / "bomb.pt"
    torch.save({"model": Bomb()}, root / "bomb_legacy.pt", _use_new_zipfile_serialization=False)
    extra["bomb_legacy.pt"] = root / "bomb_legacy.pt"
    extra["marker"] = root / "code_ran"
    torch.save({"model": RunsCode(extra["marker"])}, root / "evil.pt")
    extra["evil.pt"] = root / "evil.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), root / "not_vit.pt")
    extra["not_vit.pt"] = root / "not_vit.pt"
    nan_state = {k: v.clone() for k, v in model.state_dict().items()}
    nan_state["head.weight"].fill_(float("nan"))
    torch.save({"arch": "test_vit", "state_dict": nan_state}, root / "nan.pt")
    extra["nan.pt"] = root / "nan.pt"

    proto = onnx.load(str(made.onnx))
    for prop in proto.metadata_props:
        if prop.key == "tome.tokens_per_layer":
            prop.value = "[101, 93,"  # cut JSON
    onnx.save(proto, str(root / "bad_meta.onnx"))
    extra["bad_meta.onnx"] = root / "bad_meta.onnx"
    proto = onnx.load(str(made.onnx))
    proto.graph.node.append(
        onnx.helper.make_node("NoSuchOperator", [proto.graph.output[0].name], ["unused"], domain="com.example.unknown")
    )
    proto.opset_import.append(onnx.helper.make_opsetid("com.example.unknown", 1))
    onnx.save(proto, str(root / "unknown_op.onnx"))
    extra["unknown_op.onnx"] = root / "unknown_op.onnx"
    write("garbage.onnx", b"\x08\x07garbage that is not protobuf" * 10)

    write("no_sidecar.plan", b"engine bytes")
    write("truncated.plan", b"engine bytes, cut")
    (root / "truncated.plan.json").write_text(
        json.dumps(engine_sidecar(root / "truncated.plan", "tensorrt", None, b"engine bytes, cut and more"))
    )
    tome = {
        p.key[len("tome.") :]: json.loads(p.value)
        for p in onnx.load(str(made.onnx)).metadata_props
        if p.key.startswith("tome.")
    }
    write("rtx.plan", b"an engine built by TensorRT-RTX")
    (root / "rtx.plan.json").write_text(
        json.dumps(engine_sidecar(root / "rtx.plan", "tensorrt-rtx", tome, b"an engine built by TensorRT-RTX"))
    )

    photo = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(photo).save(root / "photo.png")
    extra["photo.png"] = root / "photo.png"
    write("broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "a_folder").mkdir()
    extra["a_folder"] = root / "a_folder"
    (root / "existing_repo" / "m" / "1").mkdir(parents=True)
    (root / "existing_repo" / "m" / "config.pbtxt").write_text("# edited by hand\n")
    extra["existing_repo"] = root / "existing_repo"
    os.link(made.ckpt, root / "hardlink.onnx")
    extra["hardlink.onnx"] = root / "hardlink.onnx"
    os.symlink(made.ckpt, root / "symlink.onnx")
    extra["symlink.onnx"] = root / "symlink.onnx"
    extra["existing_report.json"] = root / "existing_report.json"
    extra["existing_report.json"].write_text('{"kept": true}\n')
    return made


# (command, argv template, exit code, fragments of the error line). Templates: {onnx} {ckpt} {root} {ro} and
# {name} for files[name]; {out} is a fresh path in the module folder that must not appear.
CASES = {
    # --- output paths: every file a command writes -------------------------------------------------------
    "export-report-onto-checkpoint": ("export", "{ckpt} -o {out} --report {ckpt}", 2, ["--report", "also an input"]),
    "export-report-onto-output": ("export", "test_vit -o {out} --report {out}", 2, ["also the -o output"]),
    "export-report-read-only-folder": ("export", "test_vit -o {out} --report {ro}/r.json", 2, ["not writable"]),
    "export-report-is-directory": ("export", "test_vit -o {out} --report {a_folder}", 2, ["is a directory"]),
    "export-output-onto-checkpoint": ("export", "{ckpt} -o {ckpt}", 2, ["also an input"]),
    "export-output-hard-link-to-input": ("export", "{ckpt} -o {hardlink.onnx}", 2, ["also an input"]),
    "export-output-symlink-to-input": ("export", "{ckpt} -o {symlink.onnx}", 2, ["also an input"]),
    "export-output-missing-folder": ("export", "test_vit -o {root}/nope/m.onnx", 2, ["does not exist", "mkdir -p"]),
    "export-output-read-only-folder": ("export", "test_vit -o {ro}/m.onnx", 2, ["not writable"]),
    "export-output-is-directory": ("export", "test_vit -o {a_folder}", 2, ["is a directory"]),
    "validate-report-onto-onnx": ("validate", "test_vit {onnx} --report {onnx}", 2, ["--report", "also an input"]),
    "validate-save-reference-onto-checkpoint": (
        "validate",
        "{ckpt} {onnx} --save-reference {ckpt}",
        2,
        ["--save-reference", "also an input"],
    ),
    "validate-save-reference-is-report": (
        "validate",
        "test_vit {onnx} --save-reference {out} --report {out}",
        2,
        ["also the --report output"],
    ),
    "validate-report-read-only-folder": ("validate", "test_vit {onnx} --report {ro}/r.json", 2, ["not writable"]),
    "build-output-onto-onnx": ("build", "{onnx} -o {onnx}", 2, ["also an input"]),
    "build-timing-cache-is-engine": (
        "build",
        "{onnx} -o {out} --timing-cache {out}",
        2,
        ["--timing-cache", "also the -o output"],
    ),
    "build-output-missing-folder": ("build", "{onnx} -o {root}/nope/m.plan", 2, ["does not exist"]),
    "visualize-output-onto-image": ("visualize", "test_vit {photo.png} -o {photo.png}", 2, ["also an input"]),
    "visualize-output-not-png": ("visualize", "test_vit {photo.png} -o {root}/m.jpg", 2, [".png"]),
    "triton-name-path-traversal": (
        "deploy",
        "triton-repo {onnx} {root}/repo --name ../escape",
        2,
        ["not a valid directory name"],
    ),
    "triton-repo-is-a-file": ("deploy", "triton-repo {onnx} {ckpt}", 2, ["is a file"]),
    "triton-repo-read-only": ("deploy", "triton-repo {onnx} {ro}", 2, ["not writable"]),
    "triton-existing-model-without-overwrite": (
        "deploy",
        "triton-repo {onnx} {existing_repo} --name m",
        2,
        ["already exists", "--overwrite"],
    ),
    "triton-refused-artifact-writes-nothing": (
        "deploy",
        "triton-repo {rtx.plan} {root}/repo --name rtx",
        2,
        ["tensorrt-rtx", "full TensorRT"],
    ),
    "triton-max-delay-nan": ("deploy", "triton-repo {onnx} {root}/repo --max-delay-ms nan", 2, ["--max-delay-ms"]),
    # --- damaged or hostile model files ------------------------------------------------------------------
    "checkpoint-zip-crc-flipped-bytes": ("export", "{crc.pt} --model test_vit -o {out}", 2, ["CRC", "crc.pt"]),
    "checkpoint-truncated-zip": ("export", "{truncated.pt} --model test_vit -o {out}", 2, ["truncated.pt"]),
    "checkpoint-empty": ("export", "{empty.pt} --model test_vit -o {out}", 2, ["empty"]),
    "checkpoint-random-bytes": ("export", "{random.pt} --model test_vit -o {out}", 2, ["random.pt"]),
    "checkpoint-missing": ("export", "{root}/missing.pt --model test_vit -o {out}", 2, ["no such file"]),
    "safetensors-truncated": ("export", "{truncated.safetensors} --model test_vit -o {out}", 2, ["safetensors"]),
    "safetensors-bad-header": (
        "export",
        "{bad_header.safetensors} --model test_vit -o {out}",
        2,
        ["bad_header.safetensors"],
    ),
    "safetensors-header-length-lies": (
        "export",
        "{lying_header.safetensors} --model test_vit -o {out}",
        2,
        ["lying_header.safetensors"],
    ),
    "torchscript-archive": ("export", "{scripted.pt} -o {out}", 2, ["TorchScript"]),
    "pickle-of-a-non-vit": ("export", "{not_vit.pt} -o {out}", 2, ["VisionTransformer"]),
    "pickle-that-runs-code": ("export", "{evil.pt} -o {out}", 2, ["--trust-pickle", "system"]),
    "pickle-that-calls-a-constructor": ("export", "{bomb.pt} -o {out}", 2, ["constructors", "Linear"]),
    "legacy-pickle-that-calls-a-constructor": ("export", "{bomb_legacy.pt} -o {out}", 2, ["constructors", "Linear"]),
    "checkpoint-for-another-architecture": ("export", "{ckpt} --model test_vit2 -o {out}", 2, ["does not match"]),
    # --- arguments ---------------------------------------------------------------------------------------
    "seed-overflow": ("export", "test_vit --seed 99999999999999999999999 -o {out}", 2, ["--seed", "2**64 - 1"]),
    "static-batch-too-large": (
        "export",
        "test_vit --batch-size 10000000 --static-batch -o {out}",
        2,
        ["--batch-size", "4096"],
    ),
    "negative-r": ("export", "test_vit --r -3 -o {out}", 2, ["non-negative"]),
    "schedule-longer-than-depth": ("export", "test_vit --schedule 1,2,3,4,5,6,7 -o {out}", 2, ["7 layers"]),
    "inflect-out-of-range": ("export", "test_vit --r-inflect 3 -o {out}", 2, ["inflect"]),
    "image-size-not-a-patch-multiple": ("export", "test_vit --img-size 100 -o {out}", 2, ["100", "16"]),
    "opset-too-old": ("export", "test_vit --opset 15 -o {out}", 2, ["opset 15"]),
    "not-a-vit-name": ("export", "resnet18 -o {out}", 2, ["VisionTransformer"]),
    "unknown-model-name": ("export", "not_a_model_xyz -o {out}", 2, ["not_a_model_xyz"]),
    "pretrained-and-checkpoint": (
        "export",
        "test_vit --pretrained --checkpoint {ckpt} -o {out}",
        2,
        ["--pretrained", "--checkpoint"],
    ),
    "validate-batch-sizes-too-large": (
        "validate",
        "test_vit {onnx} --batch-sizes 1,10000000",
        2,
        ["--batch-sizes", "4096"],
    ),
    "validate-other-weights": ("validate", "test_vit {onnx} --seed 1", 2, ["weights", "--seed"]),
    # --- damaged artifacts -------------------------------------------------------------------------------
    "validate-onnx-runtime-cannot-load": (
        "validate",
        "test_vit {unknown_op.onnx}",
        2,
        ["ONNX Runtime cannot load", "unknown_op.onnx"],
    ),
    "validate-not-an-onnx-file": ("validate", "test_vit {garbage.onnx}", 2, ["garbage.onnx"]),
    "validate-engine-without-sidecar": ("validate", "test_vit {no_sidecar.plan}", 2, ["sidecar"]),
    "validate-truncated-engine": ("validate", "test_vit {truncated.plan}", 2, ["corrupt or truncated"]),
    "inspect-engine-without-sidecar": ("build", "--inspect {no_sidecar.plan}", 2, ["sidecar"]),
    # Size flags: bounded where the arguments are checked, before the model is loaded or anything is allocated.
    "export-img-size-too-large": ("export", "test_vit -o {out} --img-size 100000", 2, ["--img-size", "2048"]),
    "visualize-img-size-too-large": (
        "visualize",
        "test_vit {photo.png} -o {out}.png --img-size 99999999999999999999",
        2,
        ["--img-size", "2048"],
    ),
    "visualize-scale-too-large": (
        "visualize",
        "test_vit {photo.png} -o {out}.png --scale 100000",
        2,
        ["--scale", "8192"],
    ),
    "triton-max-batch-over-int32": (
        "deploy",
        "triton-repo {onnx} {root}/repo --max-batch 99999999999999999999",
        2,
        ["--max-batch", "2147483647"],
    ),
    "triton-instances-over-int32": (
        "deploy",
        "triton-repo {onnx} {root}/repo --instances 2147483648",
        2,
        ["--instances", "2147483647"],
    ),
    "triton-name-too-long": ("deploy", "triton-repo {onnx} {root}/repo --name " + "a" * 300, 2, ["--name", "1 to 128"]),
    "serve-max-batch-over-int32": ("serve", "{onnx} --port 0 --max-batch 99999999999999999999", 2, ["--max-batch"]),
    # Damaged tome.* metadata: the artifact layer's typed MetadataError, naming the file and the fix.
    "validate-damaged-metadata": ("validate", "test_vit {bad_meta.onnx}", 2, ["bad_meta.onnx", "re-export"]),
    "build-damaged-metadata": ("build", "{bad_meta.onnx} -o {out}", 2, ["bad_meta.onnx", "re-export"]),
    "triton-damaged-metadata": ("deploy", "triton-repo {bad_meta.onnx} {root}/repo", 2, ["bad_meta.onnx", "re-export"]),
}


def fill(template: str, files: Files, out: Path, ro: Path) -> list[str]:
    values = {"onnx": str(files.onnx), "ckpt": str(files.ckpt), "root": str(files.root), "out": str(out), "ro": str(ro)}
    values.update({name: str(path) for name, path in files.extra.items()})
    argv = []
    for token in template.split():
        for key in sorted(values, key=len, reverse=True):
            token = token.replace("{" + key + "}", values[key])
        argv.append(token)
    return argv


def run_refused(capsys, files: Files, command: str, argv: list[str], code, fragments) -> str:
    before = folder_state(files.root)
    returned = COMMANDS[command].main(argv)
    err = capsys.readouterr().err
    assert returned == code, err
    assert_one_line_error(err, *fragments)
    assert folder_state(files.root) == before  # inputs, earlier outputs: unchanged; nothing new, no temp file
    return err


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_with_one_line_and_nothing_changed(capsys, files, tmp_path, case):
    command, template, code, fragments = CASES[case]
    out = files.root / f"out_{case}"
    argv = fill(template, files, out, read_only_folder(tmp_path))
    run_refused(capsys, files, command, argv, code, fragments)
    assert not files["marker"].exists()  # the os.system pickle never ran


def test_failed_validation_keeps_the_existing_export(capsys, files):
    """A NaN-weight export over a good model.onnx: FAIL, exit 1, the good file untouched."""
    before = folder_state(files.root)
    assert (
        export_cli.main([str(files["nan.pt"]), "-o", str(files.onnx), "--report", str(files["existing_report.json"])])
        == 1
    )
    err = capsys.readouterr().err
    assert "FAIL" in err and "not written" in err and "Traceback" not in err
    after = folder_state(files.root)
    report = json.loads(files["existing_report.json"].read_text())
    assert report["onnx"] is None and report["validation"]["passed"] is False
    del before["existing_report.json"], after["existing_report.json"]  # the report is the one file asked for
    assert after == before


def test_pretrained_without_a_network_is_quick_and_one_line(capsys, files, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # RFC 2606: never resolves
    start = time.perf_counter()
    run_refused(
        capsys,
        files,
        "export",
        ["vit_tiny_patch16_224", "--pretrained", "-o", str(files.root / "p.onnx")],
        2,
        ["local cache", "hub.invalid", "--checkpoint"],
    )
    assert time.perf_counter() - start < 20  # hub retries took ~58 s


def test_constructor_pickle_is_refused_before_allocating():
    """Peak RSS of the refusal, against the same process loading nothing: no 1.1 GB Linear is built."""
    probe = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from tome_deploy.errors import UnsafePickleError\n"
        "from tome_deploy.models.loading.dispatch import load_model\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n    load_model(sys.argv[1])\nexcept UnsafePickleError:\n    pass\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n"
    )
    folder = Path(os.environ.get("TMPDIR", "/tmp"))
    path = folder / f"bomb_{os.getpid()}.pt"
    torch.save({"model": Bomb()}, path)
    try:
        result = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=120)
    finally:
        path.unlink()
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) < 100  # MiB; building the Linear would add ~1024


def test_overwrite_replaces_every_version_of_the_triton_model(capsys, files, tmp_path):
    repo = tmp_path / "repo"
    assert deploy_cli.main(["triton-repo", str(files.onnx), str(repo), "--name", "m"]) == 0
    (repo / "m" / "2").mkdir()
    (repo / "m" / "2" / "model.onnx").write_bytes(b"stale version Triton would serve first")
    assert deploy_cli.main(["triton-repo", str(files.onnx), str(repo), "--name", "m", "--overwrite"]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["1", "README.md", "config.pbtxt"]
    assert sha256(repo / "m" / "1" / "model.onnx") == sha256(files.onnx)
    assert [p.name for p in repo.iterdir()] == ["m"]  # no staging folder left
    # An artifact inside the folder --overwrite replaces is refused, and the folder stays.
    before = folder_state(repo)
    assert (
        deploy_cli.main(["triton-repo", str(repo / "m" / "1" / "model.onnx"), str(repo), "--name", "m", "--overwrite"])
        == 2
    )
    assert_one_line_error(capsys.readouterr().err, "inside", "--overwrite")
    assert folder_state(repo) == before


def test_unexpected_errors_are_one_line_exit_3_with_traceback_only_on_request(capsys, monkeypatch):
    def bug() -> int:
        raise ZeroDivisionError("division by zero")

    assert common.run_command(bug) == 3
    err = capsys.readouterr().err
    assert_one_line_error(err, "ZeroDivisionError", "unexpected", "please report")
    assert common.run_command(bug, debug=True) == 3
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv(common.DEBUG_VARIABLE, "1")
    assert common.run_command(bug) == 3
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, codes",
    [
        ("export", {0, 1, 2, 3, 4, 129, 130, 143}),
        ("validate", {0, 1, 2, 3, 4, 5, 129, 130, 143}),
        ("build", {0, 2, 3, 4, 129, 130, 143}),
        ("deploy", {0, 2, 3, 129, 130, 143}),
        ("visualize", {0, 2, 3, 129, 130, 143}),
        ("serve", {0, 2, 3, 4, 129, 130, 143}),
    ],
)
def test_help_lists_the_exit_codes_the_command_can_return(command, codes):
    epilog = COMMANDS[command].build_parser().epilog
    section = epilog.split("exit codes: ")[1].split(";")[0]
    listed = {int(code) for code in re.findall(r"(?:^|, )(\d+) ", section)}
    assert listed == codes
