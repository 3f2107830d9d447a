"""bf16 in OpenVINO: the IR computes the transformer's MatMuls in bf16 and every matching node in f32, as
written and as the CPU plugin runs it, at the f32 inference precision the runners pass and under a plain
compile_model (OpenVINO's default, bf16 on CPUs that have it); the bundled digits ViT at r=3 keeps the fp32
ToMe model's top-1 on all 1797 digits both ways; the export reports its merge agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tome_deploy.artifact.matching import matching_nodes
from tome_deploy.artifact.onnx_file import load_onnx
from tome_deploy.jobs.export import export_model
from tome_deploy.models.digits import ARCH, digits_data, load_digits_vit, pixels_from_digits
from tome_deploy.models.loading.source import ModelSource
from tome_deploy.models.patch import apply_tome
from tome_deploy.runtime.openvino import OpenVINORunner

DEPTH = 6  # the digits ViT's blocks
# Each block's transformer MatMuls: qkv, q @ k^T, attention @ v, proj, fc1, fc2; and the head.
TRANSFORMER_MATMULS = 6 * DEPTH + 1
FLOAT_TYPES = {"f32", "bf16", "f16", "f64"}


def cpu_has_bf16() -> bool:
    """What OpenVINO's CPU plugin says it can compute in (its OPTIMIZATION_CAPABILITIES)."""
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@pytest.fixture(scope="module")
def digits_exports(tmp_path_factory):
    """The digits ViT at r=3: its fp32 ONNX export (for the names of its matching nodes), and its bf16 IR
    written by the export job with validation (the IR and the outcome)."""
    folder = tmp_path_factory.mktemp("bf16")
    onnx_path = folder / "digits_r3.onnx"
    export_model(ModelSource(ARCH), onnx_path, r=3, validate=False)
    outcome = export_model(
        ModelSource(ARCH), folder / "digits_r3_bf16.xml", r=3, precision="bf16", runtime="openvino", validate=True
    )
    return onnx_path, outcome.export.path, outcome


def ir_layers(xml: Path) -> list[tuple[str, str, list[str]]]:
    """(name, type, output element types) of every node of an IR, read with OpenVINO."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    return [
        (
            node.get_friendly_name(),
            node.get_type_name(),
            [out.get_element_type().get_type_name() for out in node.outputs()],
        )
        for node in model.get_ordered_ops()
    ]


def test_the_written_ir_keeps_every_matching_node_f32_and_only_transformer_matmuls_in_bf16(digits_exports):
    onnx_path, xml, _ = digits_exports
    matching = matching_nodes(load_onnx(onnx_path))
    layers = ir_layers(xml)
    matching_layers = [layer for layer in layers if layer[0] in matching]
    # The matching subgraph is all there: the keys' mean, the normalisation, scores, best match, order, log(size);
    # its divisions are written as products (the Multiply keeps the Divide's name).
    assert {"ReduceMean", "ReduceL2", "Multiply", "MatMul", "TopK", "GatherElements", "Log"} <= {
        op for _, op, _ in matching_layers
    }
    assert "Divide" not in {op for _, op, _ in matching_layers}
    for name, op, types in matching_layers:
        float_types = {t for t in types if t in FLOAT_TYPES}
        assert float_types <= {"f32"}, f"matching node {name} ({op}) computes in {float_types}"
    bf16_matmuls = [name for name, op, types in layers if op == "MatMul" and types == ["bf16"]]
    assert len(bf16_matmuls) == TRANSFORMER_MATMULS
    assert not set(bf16_matmuls) & matching


def test_openvino_runs_the_matching_in_f32_and_the_transformer_in_bf16(digits_exports):
    """The CPU plugin's own record of what it ran (the runtime model's runtimePrecision per layer)."""
    from tome_deploy.runtime.openvino_bf16 import runtime_layers

    onnx_path, xml, _ = digits_exports
    matching = matching_nodes(load_onnx(onnx_path))
    with OpenVINORunner(xml) as runner:
        layers = runtime_layers(runner.compiled)
    ran_matching = [(op, precision) for op, precision, names in layers if set(names) & matching]
    assert {"TopK", "MatMul"} <= {op for op, _ in ran_matching}
    assert all(precision != "bf16" for _, precision in ran_matching), ran_matching
    fully_connected = {precision for op, precision, _ in layers if op == "FullyConnected"}
    # On a CPU without bf16 OpenVINO runs the bf16 MatMuls in f32.
    assert fully_connected == ({"bf16"} if cpu_has_bf16() else {"f32"})


def exact_in_bf16_broadcasts(xml: Path) -> set[str]:
    """Names of the IR's Broadcasts of a constant whose every value bf16 holds exactly (the sizes' initial
    ones): the CPU plugin makes them new nodes that run at its default precision without changing a value."""
    import openvino as ov

    names = set()
    for node in ov.Core().read_model(str(xml)).get_ordered_ops():
        source = node.input_value(0).get_node() if node.get_type_name() == "Broadcast" else None
        if source is not None and source.get_type_name() == "Constant":
            values = np.asarray(source.get_data(), dtype=np.float32)  # [...]
            if not np.any(values.view(np.uint32) & 0xFFFF):  # bf16 keeps the top 16 bits of an f32
                names.add(node.get_friendly_name())
    return names


def test_a_plain_compile_model_runs_the_matching_in_f32_and_the_transformer_in_bf16(digits_exports):
    """openvino.Core().compile_model with no configuration: OpenVINO's default inference precision (bf16 on
    a CPU that has it) lowers every unmarked node, and the IR's forms and marks keep the matching in f32."""
    import openvino as ov

    from tome_deploy.runtime.openvino_bf16 import runtime_layers

    onnx_path, xml, _ = digits_exports
    matching = matching_nodes(load_onnx(onnx_path))
    layers = runtime_layers(ov.Core().compile_model(str(xml), "CPU"))
    ran_matching = [(op, precision, names) for op, precision, names in layers if set(names) & matching]
    assert {"TopK", "MatMul"} <= {op for op, _, _ in ran_matching}
    exact = exact_in_bf16_broadcasts(xml)
    in_bf16 = [(op, names) for op, precision, names in ran_matching if precision == "bf16"]
    assert all(set(names) <= exact for _, names in in_bf16), in_bf16
    fully_connected = {precision for op, precision, _ in layers if op == "FullyConnected"}
    assert fully_connected == ({"bf16"} if cpu_has_bf16() else {"f32"})


@pytest.fixture(scope="module")
def digits_and_fp32_tome_top1():
    """All 1797 digits as pixels, and the fp32 ToMe model's top-1 class on each in PyTorch."""
    pixels = pixels_from_digits(torch.as_tensor(digits_data()["images"]).float())  # [1797, 3, 32, 32]
    tome, _ = apply_tome(load_digits_vit(), 3)
    with torch.inference_mode():
        expected = tome(pixels).argmax(-1).numpy()  # [1797]
    return pixels.numpy(), expected


def top1_in_batches(infer, pixels: np.ndarray) -> np.ndarray:
    """The top-1 class of every image, `infer` (pixels [n, 3, 32, 32] -> logits [n, 10]) run on 256 at a time."""
    return np.concatenate([infer(pixels[i : i + 256]) for i in range(0, len(pixels), 256)]).argmax(-1)  # [N]


@pytest.mark.slow
def test_digits_top1_agrees_with_fp32_tome_on_every_digit(digits_exports, digits_and_fp32_tome_top1):
    """All 1797 digits: the bf16 IR at the runners' f32 inference precision against the fp32 ToMe model in
    PyTorch (naive bf16 gave 98.6%)."""
    _, xml, _ = digits_exports
    pixels, expected = digits_and_fp32_tome_top1
    with OpenVINORunner(xml) as runner:
        got = top1_in_batches(lambda batch: runner.infer({"pixel_values": batch})["logits"], pixels)
    assert np.mean(got == expected) >= 0.995


@pytest.mark.slow
def test_digits_top1_agrees_with_fp32_tome_under_a_plain_compile_model(digits_exports, digits_and_fp32_tome_top1):
    """All 1797 digits: the bf16 IR compiled with no configuration (OpenVINO's default precision, bf16 on a
    CPU that has it) against the fp32 ToMe model in PyTorch."""
    import openvino as ov

    _, xml, _ = digits_exports
    pixels, expected = digits_and_fp32_tome_top1
    request = ov.Core().compile_model(str(xml), "CPU").create_infer_request()
    got = top1_in_batches(lambda batch: request.infer({"pixel_values": batch})["logits"], pixels)
    assert np.mean(got == expected) >= 0.995


def test_the_bf16_export_reports_merge_agreement_and_writes_an_ir_with_its_metadata(digits_exports):
    from tome_deploy.artifact.metadata import ToMeMetadata
    from tome_deploy.runtime.openvino import read_ir_metadata

    _, _, outcome = digits_exports
    assert outcome.written and outcome.validation is not None
    verdicts = outcome.validation.verdicts
    assert verdicts and all(v.merge_agreement is not None and 0 <= v.merge_agreement <= 1 for v in verdicts)
    # The constant probe: every patch alike, matching decided by ties alone, which bf16 keeps.
    assert all(v.merge_agreement == 1.0 for v in verdicts if v.probe == "constant")
    written = outcome.export.path
    assert written.suffix == ".xml" and written.with_suffix(".bin").is_file()
    metadata = ToMeMetadata.from_props(read_ir_metadata(written))
    assert metadata is not None and metadata.precision == "bf16"


def test_a_bf16_ir_is_served_and_goes_to_tritons_openvino_backend_with_its_precision(digits_exports, tmp_path):
    from tome_deploy.cli import deploy as deploy_cli
    from tome_deploy.runtime.factory import open_runner
    from tome_deploy.serving.served_model import read_served_model, run_padded

    _, xml, _ = digits_exports
    served = read_served_model(xml)
    assert served.kind == "openvino_ir" and served.metadata.precision == "bf16"
    assert served.model_input.shape == (-1, 3, 32, 32) and served.num_classes == 10
    digits = pixels_from_digits(torch.as_tensor(digits_data()["images"][:5]).float()).numpy()  # [5, 3, 32, 32]
    with open_runner(xml, "openvino") as runner:
        logits = run_padded(runner, served, {served.model_input.name: digits})[served.outputs[0].name]
    assert logits.shape == (5, 10) and np.isfinite(logits).all()

    assert deploy_cli.main(["triton-repo", str(xml), str(tmp_path / "models"), "--name", "digits"]) == 0
    version = tmp_path / "models" / "digits" / "1"
    assert (version / "model.xml").read_bytes() == xml.read_bytes()
    assert (version / "model.bin").read_bytes() == xml.with_suffix(".bin").read_bytes()
    config = (tmp_path / "models" / "digits" / "config.pbtxt").read_text()
    assert 'backend: "openvino"' in config and "platform" not in config
    for key, value in (("tome.precision", "bf16"), ("INFERENCE_PRECISION_HINT", "f32")):
        assert f'key: "{key}"' in config and f'string_value: "{value}"' in config


def test_tome_validate_judges_a_bf16_ir_by_its_agreement(digits_exports):
    from tome_deploy.jobs.validate import validate_model

    _, xml, _ = digits_exports
    metadata, report = validate_model(ModelSource(ARCH), xml, runtime="openvino", batch_sizes=[2])
    assert metadata.precision == "bf16" and report.passed
    assert "merges" in report.table() and all(v.merge_agreement is not None for v in report.verdicts)
