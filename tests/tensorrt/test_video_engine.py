"""A ToMe video export built ahead of time by TensorRT-RTX on CPU (SM89): the VideoMAE folder of the session's
`video_export` exported for TensorRT (matmul) and built by tome-build; the sidecar records the clip's shape and the
export's metadata. Running the engine needs a CUDA GPU (not here)."""

from __future__ import annotations

import pytest
from conftest import build_rtx_engine

from tome_deploy.artifact.onnx_file import read_metadata
from tome_deploy.cli import export as export_cli

pytestmark = pytest.mark.tensorrt

pytest.importorskip(
    "tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install 'tome-deploy[tensorrt-rtx]')"
)


@pytest.mark.slow
def test_a_videomae_export_for_tensorrt_builds_with_the_clip_in_its_sidecar(video_export, tmp_path, capsys):
    onnx_path, plan = tmp_path / "video_trt.onnx", tmp_path / "video.plan"
    args = [str(video_export.folder), "--r", "6", "--target", "tensorrt", "-o", str(onnx_path), "--no-validate"]
    assert export_cli.main([*args, "--quiet"]) == 0, capsys.readouterr().err
    sidecar, metadata = build_rtx_engine(onnx_path, plan, capsys), read_metadata(onnx_path)
    assert sidecar.input_shape == [4, 3, 32, 32] and sidecar.tome == metadata
    assert metadata.merge == "matmul" and metadata.tokens_per_layer == [32, 26, 20]
    assert sidecar.plan_bytes == plan.stat().st_size > 0
