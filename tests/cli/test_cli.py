"""The command-line tools end to end: real files, real ONNX Runtime, exit codes and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import onnx
import pytest
import timm
import torch
from conftest import assert_one_line_error

from tome_deploy.cli import export as export_cli
from tome_deploy.cli import validate as validate_cli

SMALL = ["test_vit", "--r", "8"]


def run_export(capsys, *args: str) -> tuple[int, str, str]:
    code = export_cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def exported_cli(tmp_path_factory):
    """One export through the CLI, reused: (onnx path, JSON printed on stdout, stderr)."""
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "test_vit_tome.onnx"
    code = export_cli.main(
        [*SMALL, "-o", str(path), "--json", "--report", str(folder / "report.json"), "--batch-size", "2"]
    )
    assert code == 0
    return path, folder


def test_export_writes_validated_onnx_and_json_report(exported_cli):
    path, folder = exported_cli
    report = json.loads((folder / "report.json").read_text())
    assert report["validation"]["passed"] is True
    assert {c["probe"] for c in report["validation"]["checks"]} == {"random", "constant", "natural"}
    assert {c["batch"] for c in report["validation"]["checks"]} == {1, 2, 3}
    meta = report["metadata"]
    assert meta["r_effective"] == [8] * 6 and meta["tokens_per_layer"] == [101 - 8 * i for i in range(7)]
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["tome.tokens_per_layer"]) == meta["tokens_per_layer"]
    assert json.loads(props["tome.model"]) == "test_vit"


def test_export_prints_schedule_and_parity_table_on_stderr_json_on_stdout(capsys, tmp_path):
    code, out, err = run_export(capsys, "test_vit", "--r", "40", "-o", str(tmp_path / "m.onnx"), "--json")
    assert code == 0
    report = json.loads(out)  # stdout is JSON and nothing else
    assert report["clamped_layers"] == [1, 2, 3, 4, 5]  # r=40 cannot hold over 6 layers of 101 tokens
    assert report["clamp_note"] and f"note: {report['clamp_note']}" in err  # one explained line
    assert "warning" not in err.lower()
    assert "r_effective" in err and "(clamped)" in err and "PASS" in err and "random init" in err
    assert "theoretical speedup" in err.lower()


def test_validate_command_passes_on_matching_weights(capsys, exported_cli):
    path, _ = exported_cli
    assert validate_cli.main(["test_vit", str(path), "--batch-sizes", "1,4"]) == 0
    out, err = capsys.readouterr()
    assert "PASS" in err and out == ""


def test_validate_refuses_other_weights(capsys, exported_cli):
    path, _ = exported_cli
    assert validate_cli.main(["test_vit", str(path), "--seed", "1"]) == 2
    assert_one_line_error(capsys.readouterr().err, "weights", "--seed")


def test_validate_refuses_foreign_onnx(capsys, tmp_path):
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "plain.onnx"))
    assert validate_cli.main(["test_vit", str(tmp_path / "plain.onnx")]) == 2
    assert_one_line_error(capsys.readouterr().err, "tome-deploy metadata")


def test_export_from_safetensors_checkpoint_file(capsys, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    model = timm.create_model("test_vit").eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    code, _, err = run_export(
        capsys, str(tmp_path / "w.safetensors"), "--model", "test_vit", "--r", "8", "-o", str(tmp_path / "m.onnx")
    )
    assert code == 0, err
    assert "random init" not in err and "PASS" in err


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["test_vit", "--r", "-3"], ["non-negative"]),
        (["test_vit", "--r", "1.5"], ["integer"]),
        (["test_vit", "--schedule", "1,2,3,4,5,6,7"], ["7 layers", "6 blocks"]),
        (["test_vit", "--r", "40", "--strict"], ["clamped", "--strict"]),
        (["test_vit", "--r-inflect", "3"], ["inflect"]),
        (["test_vit", "--img-size", "100"], ["100", "16"]),
        (["resnet18"], ["VisionTransformer"]),
        (["not_a_model_name_xyz"], ["not_a_model_name_xyz"]),
        (["missing_file.pt", "--model", "test_vit"], ["missing_file.pt"]),
        (["test_vit", "--opset", "15"], ["opset 15", "16"]),
        (["test_vit", "--precision", "bf16"], ["bf16 runs in OpenVINO", "--runtime openvino", "NAME.xml"]),
        (["test_vit", "--precision", "bf16", "--runtime", "openvino"], ["OpenVINO IR", "-o NAME.xml"]),
        (["test_vit", "--precision", "int8", "--target", "tensorrt"], ["int8", "fp32 or fp16"]),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(capsys, tmp_path, args, fragments):
    code, out, err = run_export(capsys, *args, "-o", str(tmp_path / "m.onnx"), "--no-validate")
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert not (tmp_path / "m.onnx").exists()


def test_an_openvino_ir_output_needs_the_openvino_runtime(capsys, tmp_path):
    code, _, err = run_export(capsys, "test_vit", "-o", str(tmp_path / "m.xml"), "--no-validate")
    assert code == 2
    assert_one_line_error(err, "OpenVINO IR", "--runtime openvino")
    assert not (tmp_path / "m.xml").exists() and not (tmp_path / "m.bin").exists()


def test_output_directory_that_does_not_exist(capsys, tmp_path):
    code, _, err = run_export(capsys, *SMALL, "-o", str(tmp_path / "nope" / "m.onnx"))
    assert code == 2
    assert_one_line_error(err, "does not exist", "mkdir")


def test_corrupt_checkpoint_file(capsys, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(2048))
    code, _, err = run_export(capsys, str(bad), "--model", "test_vit", "-o", str(tmp_path / "m.onnx"))
    assert code == 2
    assert_one_line_error(err, "bad.pt")
    assert bad.stat().st_size == 2048  # the input is left alone


class Unknown(torch.nn.Module):
    """A module class outside torch and timm: its pickle must not load without --trust-pickle."""

    def __init__(self):
        super().__init__()
        self.vit = timm.create_model("test_vit")


def test_pickle_with_unknown_globals_needs_trust_pickle(capsys, tmp_path):
    torch.save(Unknown(), tmp_path / "module.pt")
    code, _, err = run_export(capsys, str(tmp_path / "module.pt"), "-o", str(tmp_path / "m.onnx"), "--no-validate")
    assert code == 2
    assert_one_line_error(err, "--trust-pickle", "Unknown")


def test_help_runs_without_heavy_imports():
    """--help must work even where torch or onnx would be slow or missing: it must not import them."""
    for module in ("tome_deploy.cli.export", "tome_deploy.cli.validate", "tome_deploy.cli.tune"):
        probe = (
            "import sys, runpy; sys.argv=['x', '--help']\n"
            f"try:\n    runpy.run_module('{module}', run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'timm') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
        )
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "usage:" in result.stdout


def test_console_scripts_are_installed():
    result = subprocess.run(["tome-export", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--merge" in result.stdout
