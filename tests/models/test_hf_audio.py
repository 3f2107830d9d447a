"""ToMe for transformers' Audio Spectrogram Transformer (ASTForAudioClassification, ASTModel), loaded from
save_pretrained folders (tests/family_sources.py: 100 frames x 32 mel bins, overlapping 16 x 16 patches with
strides of 10, 2 x 9 patches + 2 prefix tokens). Every output is compared with tests/reference_audio.py, a
plain float64 reference that does not import tome_deploy; the token counts with the convolution's own output."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from family_sources import TINY_HF_AST
from reference_audio import reference_hf_ast

from tome_deploy.errors import InvalidInputError, ModelLoadError
from tome_deploy.models.adapter import adapter_for, describe
from tome_deploy.models.hf_transformers import load_hf
from tome_deploy.models.patch import apply_tome, track_sources

transformers = pytest.importorskip("transformers")

CLASSES = ("ASTForAudioClassification", "ASTModel")  # conftest.ast_folders
TIME, MEL = TINY_HF_AST["max_length"], TINY_HF_AST["num_mel_bins"]


@pytest.fixture(scope="module", params=CLASSES)
def ast_model(request, ast_folders):
    model, _ = load_hf(ast_folders[request.param], pretrained=False)
    return model


def spectrograms(batch: int = 3, seed: int = 0) -> torch.Tensor:
    """[B, time, mel]: noise plus a rising tone, so the patches are neither all alike nor all different."""
    generator = torch.Generator().manual_seed(seed)
    time = torch.arange(TIME, dtype=torch.float32)[:, None]
    mel = torch.arange(MEL, dtype=torch.float32)[None, :]
    chirp = torch.exp(-(((mel - 4 - 0.25 * time) / 2.0) ** 2))  # [time, mel]
    return torch.randn(batch, TIME, MEL, generator=generator) * 0.5 + 2.0 * chirp


def assert_one_line(message: str, *fragments: str) -> None:
    """A library error the CLI prints as it is: one line holding every fragment."""
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_token_count_is_the_strided_convolutions_output(ast_model):
    adapter = adapter_for(ast_model)
    tokens, _ = adapter.embed(ast_model, spectrograms(2))
    frequency, time = (MEL - 16) // 10 + 1, (TIME - 16) // 10 + 1  # 2 x 9 overlapping windows
    assert tokens.shape == (2, frequency * time + 2, TINY_HF_AST["hidden_size"])
    shape = describe(adapter, ast_model)
    assert (shape.tokens, shape.grid, shape.num_prefix) == (frequency * time + 2, (frequency, time), 2)


def test_default_ast_has_1214_tokens_in_the_flop_model():
    """AST's defaults (1024 frames x 128 mel bins, strides 10): 12 x 101 patches + 2; the FLOP rule counts them."""
    from tome_deploy.core.flops import transformer_flops
    from tome_deploy.models.hf_audio import HFAudioModel

    with torch.device("meta"):
        model = HFAudioModel(transformers.ASTForAudioClassification(transformers.ASTConfig()), {})
    _, schedule = apply_tome(model, 0)
    assert schedule.tokens[0] == 1214
    n, c = 1214, 768
    plain_block = 8 * n * c**2 + 4 * n**2 * c + 16 * n * c**2
    assert transformer_flops(schedule.tokens, c, describe(adapter_for(model), model).mlp_ratio) == 12 * plain_block


def test_r0_is_the_model_and_the_reference(ast_model):
    x = spectrograms()
    tome, schedule = apply_tome(ast_model, 0)
    with torch.no_grad():
        out, plain = tome(x), ast_model(x)
    assert torch.equal(out, plain)
    torch.testing.assert_close(out, reference_hf_ast(ast_model.hf, x, [0, 0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r", [3, [8, 5], (4, -1.0)])
def test_r_positive_matches_the_float64_reference(ast_model, r):
    x = spectrograms()
    tome, schedule = apply_tome(ast_model, r)
    assert sum(schedule.effective) > 0
    with torch.no_grad():
        out = tome(x)
    reference = reference_hf_ast(ast_model.hf, x, list(schedule.effective))
    torch.testing.assert_close(out, reference, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, ast_model(x), atol=1e-3)  # merging changed the output: the check can fail


def test_class_and_distillation_tokens_are_never_merged(ast_model):
    tome, schedule = apply_tome(ast_model, 8)  # (20 - 2) // 2 = 9 then clamped: every mergeable pair goes
    source, size = track_sources(tome, spectrograms())
    n0 = schedule.tokens[0]
    assert torch.equal(source[:, :2], torch.eye(n0)[:2].expand(3, -1, -1))
    assert torch.equal(size[:, :2, 0], torch.ones(3, 2))
    assert torch.equal(source[:, 2:, :2], torch.zeros(3, source.shape[1] - 2, 2))


def test_input_spec_records_the_feature_extractor(ast_model):
    spec = adapter_for(ast_model).input_spec(ast_model)
    assert (spec.kind, spec.name, spec.shape) == ("audio_spectrogram", "input_values", (TIME, MEL))
    assert dict(spec.preprocessing) == {
        "feature_extractor": "ASTFeatureExtractor",
        "sampling_rate": 8000,
        "num_mel_bins": MEL,
        "max_length": TIME,
        "mean": -3.5,
        "std": 4.0,
        "do_normalize": True,
    }


def test_without_preprocessor_config_the_feature_extractors_defaults(ast_folders, tmp_path):
    folder = tmp_path / "bare"
    shutil.copytree(ast_folders["ASTModel"], folder)
    (folder / "preprocessor_config.json").unlink()
    model, _ = load_hf(str(folder), pretrained=False)
    defaults = transformers.ASTFeatureExtractor(num_mel_bins=MEL, max_length=TIME)
    spec = adapter_for(model).input_spec(model)
    expected = {key: getattr(defaults, key) for key in ("sampling_rate", "num_mel_bins", "max_length", "mean", "std")}
    assert {key: spec.preprocessing[key] for key in expected} == expected
    assert spec.preprocessing["do_normalize"] is defaults.do_normalize


@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"num_mel_bins": 128}, ("num_mel_bins", "must equal the shape's mel axis (32), got 128")),
        ({"max_length": 1024}, ("max_length", "must equal the shape's time axis (100), got 1024")),
        ({"std": 0}, ("'std'", "got 0")),
        ({"mean": "loud"}, ("'mean'", "'loud'")),
        ({"sampling_rate": 16000.5}, ("'sampling_rate'", "whole number")),
        ({"do_normalize": "yes"}, ("'do_normalize'", "true or false")),
        ({"feature_extractor_type": "WhisperFeatureExtractor"}, ("feature_extractor_type", "WhisperFeatureExtractor")),
    ],
)
def test_a_bad_preprocessor_config_is_one_line(ast_folders, tmp_path, change, fragments):
    folder = tmp_path / "bad"
    shutil.copytree(ast_folders["ASTForAudioClassification"], folder)
    file = folder / "preprocessor_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **change}))
    with pytest.raises(ModelLoadError) as err:
        load_hf(str(folder), pretrained=False)
    assert_one_line(str(err.value), "preprocessor_config.json", *fragments)


def test_weights_of_another_spectrogram_size_are_refused_before_building(ast_folders, tmp_path):
    """config.json saying 64 mel bins where the weights hold 32: the position embeddings' shape differs."""
    folder = tmp_path / "resized"
    shutil.copytree(ast_folders["ASTForAudioClassification"], folder)
    (folder / "preprocessor_config.json").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_mel_bins": 64}))
    with pytest.raises(ModelLoadError) as err:
        load_hf(str(folder), pretrained=False)
    assert_one_line(str(err.value), "does not match the weights", "position_embeddings")


def test_a_spectrogram_of_the_wrong_length_is_refused(ast_model):
    tome, _ = apply_tome(ast_model, 3)
    for model in (ast_model, tome):
        with pytest.raises(InvalidInputError) as err:
            model(torch.zeros(1, TIME + 10, MEL))
        assert_one_line(str(err.value), f"{TIME} frames x {MEL} mel bins", "[1, 110, 32]")


# --- exports: tome-export on the folder (scatter, validated: PASS) and matmul through the library. The fused
# plugin formulation is left to the families' tests: AST's layers run the same attention and block as ViT's. ---

R = 3


@pytest.fixture(scope="module")
def cli_export(ast_cli_export):
    """tome-export FOLDER --r 3 (conftest): (exit code, stderr, path)."""
    return ast_cli_export[1:]


@pytest.fixture(scope="module")
def library_exports(ast_folders, tmp_path_factory):
    """merge -> (ToMe model, metadata, path) of the classifier at r=3 with matmul and with the fused merge op
    (plugin), dynamic batch traced at 2."""
    from tome_deploy.onnx_export.export import export_onnx
    from tome_deploy.onnx_export.metadata import build_metadata

    model, _ = load_hf(ast_folders["ASTForAudioClassification"], pretrained=False)
    folder = tmp_path_factory.mktemp("ast_exports")
    exports = {}
    for merge in ("matmul", "plugin"):
        tome, schedule = apply_tome(model, R, merge)
        metadata = build_metadata(
            tome,
            schedule,
            R,
            arch="ASTForAudioClassification",
            weights="seeded (test)",
            weights_sha256="test",
            merge=merge,
            opset=18,
            batch=None,
            example_batch=2,
        )
        exports[merge] = tome, metadata, export_onnx(tome, metadata, folder / f"ast_{merge}.onnx").path
    return exports


def run_onnx(path, x: torch.Tensor, runner: str = "onnxruntime"):
    from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner
    from tome_deploy.runtime.openvino import OpenVINORunner

    with OnnxRuntimeRunner(path) if runner == "onnxruntime" else OpenVINORunner(path) as session:
        return torch.from_numpy(session.infer({"input_values": x.numpy()})["logits"])


@pytest.mark.slow  # its fixture exports and validates (~10 s on 2 cores)
def test_tome_export_of_the_folder_passes_with_only_the_batch_symbolic(cli_export):
    import onnx
    from conftest import io_symbolic_dims

    from tome_deploy.artifact.onnx_file import read_metadata

    code, err, path = cli_export
    assert code == 0, err
    assert "PASS: 6/6 parity checks passed" in err and "tones" in err and "FAIL" not in err
    assert "20 -> 14" in err  # 2 x 9 overlapping patches + 2 prefix tokens, r=3 in both layers
    graph = onnx.load(str(path)).graph
    assert io_symbolic_dims(graph) == {"batch"}
    assert [i.name for i in graph.input] == ["input_values"]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [TIME, MEL]
    metadata = read_metadata(path)
    assert metadata.input.kind == "audio_spectrogram" and metadata.input.preprocessing["sampling_rate"] == 8000
    assert metadata.tokens_per_layer == [20, 17, 14] and metadata.num_prefix_tokens == 2


@pytest.mark.slow  # its fixture exports (~8 s on 2 cores)
def test_scatter_matmul_and_plugin_exports_equal_the_float64_reference(cli_export, library_exports, ast_folders):
    """ONNX Runtime at batch 3 (traced at 2): the CLI's scatter export, the matmul export and the plugin export
    (one fused tome::TokenMerge node per merging layer, run by ONNX Runtime's Python op) against the plain
    reference and each other."""
    import onnx

    from tome_deploy.token_merge import contract

    model, _ = load_hf(ast_folders["ASTForAudioClassification"], pretrained=False)
    x = spectrograms(3, seed=5)
    scatter = run_onnx(cli_export[2], x)
    reference = reference_hf_ast(model.hf, x, [R, R])
    torch.testing.assert_close(scatter, reference, atol=1e-4, rtol=1e-4)
    plugin_graph = onnx.load(str(library_exports["plugin"][2])).graph
    assert sum(node.op_type == contract.OP_TYPE for node in plugin_graph.node) == 2
    for merge in ("matmul", "plugin"):
        torch.testing.assert_close(run_onnx(library_exports[merge][2], x), scatter, atol=1e-5, rtol=1e-5)


def test_openvino_runs_the_exports_as_onnx_runtime(cli_export, library_exports):
    x = spectrograms(2, seed=6)
    for path in (cli_export[2], library_exports["matmul"][2]):
        torch.testing.assert_close(run_onnx(path, x, "openvino"), run_onnx(path, x), atol=1e-4, rtol=1e-4)


@pytest.mark.tensorrt
def test_tensorrt_rtx_builds_the_matmul_export_ahead_of_time(library_exports, capsys):
    from conftest import build_rtx_engine

    _, metadata, path = library_exports["matmul"]
    sidecar = build_rtx_engine(path, path.with_suffix(".plan"), capsys)
    assert sidecar.input_name == "input_values" and sidecar.input_shape == [TIME, MEL]
    assert sidecar.tome.r_effective == metadata.r_effective == [R, R]


def test_target_speedup_plans_with_the_real_token_count(ast_model):
    from tome_deploy.core.flops import theoretical_speedup
    from tome_deploy.core.speedup import speedup_choice

    shape = describe(adapter_for(ast_model), ast_model)
    choice = speedup_choice(shape, 1.15)
    tokens = [20]
    for _ in range(2):
        tokens.append(tokens[-1] - min(choice.r, (tokens[-1] - 2) // 2))
    assert choice.predicted == pytest.approx(theoretical_speedup(tokens, 32, 2.0))
    assert choice.predicted >= 1.15
    smaller = [20, 20 - (choice.r - 1), 20 - 2 * (choice.r - 1)]
    assert theoretical_speedup(smaller, 32, 2.0) < 1.15  # the smallest such r


def test_cli_refuses_img_size_and_an_unreachable_target_in_one_line(ast_folders, tmp_path, capsys):
    from conftest import assert_one_line_error

    from tome_deploy.cli import export as export_cli

    folder, out = ast_folders["ASTForAudioClassification"], str(tmp_path / "x.onnx")
    assert export_cli.main([folder, "--r", "2", "--img-size", "64", "-o", out]) == 2
    assert_one_line_error(capsys.readouterr().err, "audio_spectrogram input [100, 32] (time, mel)", "drop --img-size")
    assert export_cli.main([folder, "--target-speedup", "50", "-o", out]) == 2
    assert_one_line_error(capsys.readouterr().err, "50.00x")
    assert not (tmp_path / "x.onnx").exists()


def test_tome_serve_answers_as_onnx_runtime_and_refuses_a_wrong_length_with_400(cli_export):
    """tome-serve on the export: /infer takes [batch, 100, 32] spectrograms and answers what ONNX Runtime does;
    a clip of another length or a spectrogram without its batch axis is a 400 naming the axes."""
    import numpy as np
    from serve_process import infer_body, post_json, tome_serve

    code, err, path = cli_export
    assert code == 0, err
    x = spectrograms(2, seed=8).numpy()
    with tome_serve(path, "ast") as url:
        status, answer = post_json(url, "/v2/models/ast/infer", infer_body("input_values", x))
        assert status == 200 and answer["outputs"][0]["shape"] == [2, TINY_HF_AST["num_labels"]]
        expected = run_onnx(path, torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], expected.shape), expected, atol=1e-5)
        for shape in ([1, TIME + 10, MEL], [TIME, MEL]):
            body = infer_body("input_values", np.zeros(shape, np.float32))
            status, answer = post_json(url, "/v2/models/ast/infer", body)
            assert status == 400 and f"the model takes [batch, {TIME}, {MEL}] (batch, time, mel)" in answer["error"]


def test_tome_visualize_draws_the_groups_on_a_npy_spectrogram(ast_folders, tmp_path, capsys):
    import numpy as np
    from conftest import assert_one_line_error
    from PIL import Image

    from tome_deploy.cli import visualize as visualize_cli

    folder = ast_folders["ASTForAudioClassification"]
    np.save(tmp_path / "clip.npy", spectrograms(1)[0].numpy())
    out = tmp_path / "merges.png"
    assert visualize_cli.main([folder, str(tmp_path / "clip.npy"), "--r", str(R), "-o", str(out), "--scale", "2"]) == 0
    err = capsys.readouterr().err
    assert "2x9 = 18 patches -> 12 merged tokens" in err  # 20 - 2 * 3 tokens, less the 2 prefix tokens
    assert Image.open(out).size == (2 * 2 * TIME + 8, 2 * MEL)  # spectrogram and drawing, time across, side by side
    np.save(tmp_path / "short.npy", np.zeros((TIME - 10, MEL), np.float32))
    assert visualize_cli.main([folder, str(tmp_path / "short.npy"), "-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "short.npy is [90, 32], not [100, 32]")
    Image.new("RGB", (32, 32)).save(tmp_path / "photo.png")
    assert visualize_cli.main([folder, str(tmp_path / "photo.png"), "-o", str(tmp_path / "x.png")]) == 2
    assert_one_line_error(capsys.readouterr().err, "takes an audio spectrogram input [100, 32] (time, mel)", ".npy")
    assert not (tmp_path / "x.png").exists()
