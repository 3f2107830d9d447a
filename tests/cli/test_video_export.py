"""A save_pretrained video classifier through the whole export path: `tome-export FOLDER --r R` prints PASS,
only the batch is symbolic, the artifact records a video input spec and the tubelet token counts, ONNX Runtime
matches the plain float64 reference (tests/reference_video.py), scatter = matmul = plugin in ONNX Runtime, and
OpenVINO runs the file. VideoMAE's export is the session's `video_export` (tests/conftest.py)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import io_symbolic_dims
from family_sources import hf_video_folder
from reference_video import reference_videomae, reference_vivit

from tome_deploy.artifact.onnx_file import read_metadata
from tome_deploy.jobs.export import export_model
from tome_deploy.models.loading.dispatch import load_model
from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner

pytest.importorskip("transformers")


def clip(batch: int, seed: int) -> np.ndarray:
    """[B, T, 3, H, W]: 4 frames of 32 x 32."""
    return np.random.default_rng(seed).standard_normal((batch, 4, 3, 32, 32)).astype(np.float32)


def run_onnx(path, x: np.ndarray) -> np.ndarray:
    with OnnxRuntimeRunner(path) as runner:
        return runner.infer({"pixel_values": x})["logits"]


def plain_flops(tokens: list[int], width: int, mlp_ratio: float) -> float:
    """docs/design.md's FLOP rule: 8NC^2 + 4N^2C at a block's input tokens, 4mNC^2 at its output tokens."""
    return sum(
        8 * n * width**2 + 4 * n**2 * width + 4 * mlp_ratio * out * width**2 for n, out in zip(tokens, tokens[1:])
    )


def test_tome_export_of_a_videomae_folder_prints_pass(video_export):
    assert video_export.exit_code == 0, video_export.stderr
    assert "PASS" in video_export.stderr and "moving" in video_export.stderr  # the video probes ran
    assert video_export.report["validation"]["passed"] is True


def test_only_the_batch_is_symbolic_and_the_spec_is_the_clip(video_export):
    graph = onnx.load(str(video_export.path)).graph
    assert io_symbolic_dims(graph) == {"batch"}
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [4, 3, 32, 32]
    metadata = read_metadata(video_export.path)
    assert (metadata.input.kind, list(metadata.input.shape)) == ("video", [4, 3, 32, 32])
    assert metadata.input.preprocessing["sampling"] == "uniform"
    # 2 x 4 x 4 tubelets, no prefix token; r=6 in both layers; width 32, MLP 32 -> 64 -> 32 (m = 2)
    assert metadata.tokens_per_layer == [32, 26, 20] and metadata.num_prefix_tokens == 0
    expected = plain_flops([32, 32, 32], 32, 2.0) / plain_flops([32, 26, 20], 32, 2.0)
    assert metadata.theoretical_speedup == pytest.approx(expected, abs=1e-4)


def test_onnx_runtime_equals_the_plain_reference(video_export):
    model = load_model(str(video_export.folder)).model
    x = clip(3, seed=7)  # traced at 2
    expected = reference_videomae(model.hf, torch.from_numpy(x), [6, 6]).numpy()
    assert np.abs(run_onnx(video_export.path, x) - expected).max() <= 1e-4


@pytest.mark.slow
def test_scatter_matmul_and_plugin_exports_agree_and_openvino_runs_them(video_export, tmp_path):
    """matmul and plugin (one fused tome::TokenMerge per merging layer, run by ONNX Runtime's Python op) against
    the CLI's scatter export; OpenVINO on the scatter and matmul files."""
    from tome_deploy.runtime.openvino import OpenVINORunner
    from tome_deploy.token_merge import contract

    x = clip(3, seed=8)
    scatter = run_onnx(video_export.path, x)
    for merge in ("matmul", "plugin"):
        path = export_model(str(video_export.folder), tmp_path / f"{merge}.onnx", r=6, merge=merge, validate=False)
        path = path.export.path
        np.testing.assert_allclose(run_onnx(path, x), scatter, rtol=1e-5, atol=1e-5)
        if merge == "plugin":
            assert sum(n.op_type == contract.OP_TYPE for n in onnx.load(str(path)).graph.node) == 2
            continue
        for file in (video_export.path, path):
            with OpenVINORunner(file) as runner:
                np.testing.assert_allclose(runner.infer({"pixel_values": x})["logits"], scatter, atol=1e-4)


@pytest.mark.slow
def test_a_vivit_folder_exports_with_its_class_token_kept(tmp_path):
    folder = hf_video_folder(tmp_path / "vivit", "VivitForVideoClassification").name
    outcome = export_model(folder, tmp_path / "vivit.onnx", r=6, merge="matmul", validate=False)
    assert outcome.export.metadata.tokens_per_layer == [33, 27, 21] and outcome.export.metadata.num_prefix_tokens == 1
    assert io_symbolic_dims(onnx.load(str(outcome.export.path)).graph) == {"batch"}
    x = clip(3, seed=9)
    expected = reference_vivit(outcome.loaded.model.hf, torch.from_numpy(x), [6, 6]).numpy()
    assert np.abs(run_onnx(outcome.export.path, x) - expected).max() <= 1e-4
