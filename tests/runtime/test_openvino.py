"""OpenVINO as a runtime: parity with PyTorch for the export formulations it can run, the refusal of the
one it cannot (--merge plugin: OpenVINO has no tome::TokenMerge op), and the error without OpenVINO."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error

from tome_deploy.cli import validate as validate_cli
from tome_deploy.errors import InvalidInputError
from tome_deploy.jobs.export import export_model
from tome_deploy.models.patch import apply_tome
from tome_deploy.validation.parity import validate_runners

pytest.importorskip("openvino", reason="the openvino extra (pip install 'tome-deploy[openvino]') is not installed")

from tome_deploy.runtime.openvino import OpenVINORunner

GOLDEN = Path(__file__).parents[1] / "data" / "golden_logits.npz"


@pytest.mark.parametrize("merge", ["scatter", "matmul"])
def test_test_vit_parity_in_openvino(export_cached, merge):
    exported = export_cached("vit_class_token", merge)
    report = validate_runners(
        exported.tome, [OpenVINORunner(exported.path)], exported.metadata, str(exported.path), batch_sizes=[1, 3]
    )
    assert report.passed, report.table()
    assert {v.runner for v in report.verdicts} == {"openvino"}


@pytest.mark.slow
@pytest.mark.parametrize("merge", ["scatter", "matmul"])
def test_vit_small_r16_in_openvino_matches_pytorch_and_the_release(release_export, merge):
    """OpenVINO matches PyTorch on every probe, and the 0.1.0 release's logits (ONNX Runtime)."""
    outcome = release_export("vit_small_patch16_224", 16, merge)  # the export test_export_unchanged checks
    tome, metadata = apply_tome(outcome.loaded.model, 16, merge)[0], outcome.export.metadata
    with OpenVINORunner(outcome.export.path) as runner:  # one compiled model for both checks
        report = validate_runners(tome, [runner], metadata, str(outcome.export.path), batch_sizes=[2])
        assert report.passed, report.table()
        assert runner.is_active  # validate_runners leaves a runner it did not activate active
        pixels = np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)
        logits = runner.infer({"pixel_values": pixels})["logits"]
    golden = np.load(GOLDEN)[f"vit_small_patch16_224_r16_{merge}"]
    assert np.abs(logits - golden).max() <= 1e-4


def test_plugin_exports_are_refused_with_the_fix(export_cached, capsys):
    exported = export_cached("vit_class_token", "plugin")
    with pytest.raises(InvalidInputError, match=r"tome::TokenMerge.*--merge scatter or --merge matmul"):
        OpenVINORunner(exported.path)
    with pytest.raises(InvalidInputError, match="OpenVINO has no tome::TokenMerge op"):
        export_model("test_vit", exported.path.parent / "p.onnx", r=4, merge="plugin", runtime="openvino")
    assert not (exported.path.parent / "p.onnx").exists()


def test_tome_validate_runtime_openvino_table_and_json(release_export, tmp_path, capsys):
    path = release_export("test_vit", 4, "scatter").export.path
    report_path = tmp_path / "report.json"
    assert (
        validate_cli.main(
            ["test_vit", str(path), "--runtime", "openvino", "--batch-sizes", "2", "--report", str(report_path)]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "Validating OpenVINO (CPU) against PyTorch" in err and "PASS" in err
    checks = json.loads(report_path.read_text())["validation"]["checks"]
    assert checks and all(c["runner"] == "openvino" and c["passed"] for c in checks)


def test_without_openvino_the_cli_names_the_extra(tmp_path):
    """A package named openvino that fails to import stands for a machine without OpenVINO."""
    shadow = tmp_path / "shadow" / "openvino"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named openvino')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tome_deploy.cli.export",
            "test_vit",
            "-o",
            str(tmp_path / "m.onnx"),
            "--runtime",
            "openvino",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 4, done.stderr
    assert_one_line_error(done.stderr, "tome-deploy[openvino]")
    assert not (tmp_path / "m.onnx").exists()


def test_openvino_ir_keeps_the_tome_metadata_and_the_numbers(export_cached, tmp_path):
    from tome_deploy.artifact.metadata import ToMeMetadata
    from tome_deploy.runtime.openvino import read_ir_metadata, save_ir

    exported = export_cached("vit_class_token", "scatter")
    xml = save_ir(exported.path, tmp_path / "model.xml")
    assert xml.with_suffix(".bin").is_file()
    assert ToMeMetadata.from_props(read_ir_metadata(xml)) == exported.metadata
    pixels = np.random.default_rng(0).standard_normal((2, *exported.metadata.input.shape)).astype(np.float32)
    with OpenVINORunner(exported.path) as from_onnx_runner, OpenVINORunner(xml) as from_ir_runner:
        from_onnx = from_onnx_runner.infer({"pixel_values": pixels})["logits"]
        from_ir = from_ir_runner.infer({"pixel_values": pixels})["logits"]
    assert np.abs(from_onnx - from_ir).max() <= 1e-6


@pytest.mark.slow
def test_openvino_profile_counts_the_matching_and_merging_layers(export_cached, release_export):
    """The benchmark's OpenVINO merge share: layers from TokenMerger nodes count (the score order's TopK, the
    merge's ScatterND), the transformer's FullyConnected layers never do, and an unmerged export has none.
    Which layers count, not how long they take: times are not asserted."""
    from tome_deploy.runtime.profiling import profile_side_by_side

    exported = export_cached("vit_class_token", "scatter")
    unmerged = release_export("test_vit", 0, "scatter").export.path
    pixels = np.random.default_rng(0).standard_normal((2, *exported.metadata.input.shape)).astype(np.float32)
    profiles = profile_side_by_side(
        "openvino", {"tome": exported.path, "plain": unmerged}, "pixel_values", pixels, runs=1
    )
    tome = profiles["tome"]
    merge_types, all_types = set(tome.op_types(merge_only=True)), set(tome.op_types())
    assert {"TopK", "ScatterNDUpdate"} <= merge_types and "FullyConnected" in all_types - merge_types
    assert profiles["plain"].layers and not any(layer.merge for layer in profiles["plain"].layers)
