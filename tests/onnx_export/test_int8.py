"""Int8 exports of the bundled digits ViT at r=3 by tome-export: ONNX Runtime dynamic and static QDQ,
OpenVINO NNCF.

The written graphs are walked to prove that no matching or merging node was quantized, and every digit
(1797) is classified to measure top-1 agreement with the fp32 ToMe export (once per int8 path, against one
shared fp32 reference). One export goes through tome-export with validation (dynamic, the default without
--data); the static and NNCF files are the export job's int8 step (`quantize_artifact`, calibrated by
`read_calibration_set` from the image folder, as `--data` does) applied to the shared fp32 export, which
saves two exports: the flags that choose them are tested below as one-line errors, NNCF through tome-tune in
tests/jobs/test_tune.py, and an IR's validation with merge agreement in tests/runtime/test_bf16.py."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import assert_one_line_error
from PIL import Image

from tome_deploy.artifact.onnx_file import read_metadata
from tome_deploy.cli import export as export_cli
from tome_deploy.errors import InvalidInputError
from tome_deploy.jobs.export import export_model, quantize_artifact
from tome_deploy.jobs.int8 import read_calibration_set
from tome_deploy.jobs.progress import silent
from tome_deploy.models.digits import digits_data, pixels_from_digits
from tome_deploy.models.loading.dispatch import load_model
from tome_deploy.models.loading.source import ModelSource
from tome_deploy.onnx_export import quantize
from tome_deploy.onnx_export.quantize import calibration_batches
from tome_deploy.quality.split import split_indices
from tome_deploy.runtime.factory import open_runner

R = 3  # the digits model's moderate r (tests/models/test_digits.py): 65 tokens -> 47 after 6 blocks
MIN_AGREEMENT = 0.995  # top-1 agreement with the fp32 ToMe export over all 1797 digits
CALIBRATION = slice(0, 1797, 30)  # 60 digits, every 30th
MERGING_BLOCKS = 6  # every block of the digits ViT merges at r=3

# Ops that would mean a matching node sees quantized values or was replaced by a quantized kernel.
QUANTIZING_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "QLinearMatMul",
    "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat",
}
BELOW_FP32 = {
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT4,
    onnx.TensorProto.UINT4,
}


def reference_matching_nodes(graph) -> dict[str, onnx.NodeProto]:
    """The matching subgraph, written plainly for this test: every node whose exporter scope names a
    TokenMerger (`.merger`), plus each Log of a size and the Transpose / Unsqueeze after it (the
    proportional-attention bias log(size))."""
    found = {}
    for node in graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        if ".merger" in scopes:
            found[node.name] = node
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for log in [node for node in graph.node if node.op_type == "Log"]:
        found[log.name] = log
        chain = [log]
        while chain:
            for after in consumers.get(chain.pop().output[0], []):
                if after.op_type in ("Transpose", "Unsqueeze"):
                    found[after.name] = after
                    chain.append(after)
    return found


def assert_matching_untouched(original: onnx.ModelProto, quantized: onnx.ModelProto) -> None:
    """Every matching node of `original` is in `quantized` with its op, inputs and outputs, none of its
    inputs comes from a quantizing op, and every tensor it reads or writes is fp32 or an index type."""
    expected = reference_matching_nodes(original.graph)
    assert sum(node.op_type == "MatMul" for node in expected.values()) == MERGING_BLOCKS  # the score a @ b^T
    assert sum(node.op_type == "Log" for node in expected.values()) == MERGING_BLOCKS - 1  # log(size)
    inferred = onnx.shape_inference.infer_shapes(quantized)
    types = {value.name: value.type.tensor_type.elem_type for value in inferred.graph.value_info}
    types |= {init.name: init.data_type for init in inferred.graph.initializer}
    producers = {output: node for node in quantized.graph.node for output in node.output}
    nodes = {node.name: node for node in quantized.graph.node}
    for name, node in expected.items():
        after = nodes.get(name)
        assert after is not None, f"{name} ({node.op_type}) is gone from the quantized graph"
        assert (after.op_type, list(after.input), list(after.output)) == (
            node.op_type,
            list(node.input),
            list(node.output),
        ), name
        for tensor in after.input:
            producer = producers.get(tensor)
            assert producer is None or producer.op_type not in QUANTIZING_OPS, f"{name} reads {producer.op_type}"
            assert producer is None or producer.op_type != "Cast" or types.get(tensor) not in BELOW_FP32, name
        for tensor in [*after.input, *after.output]:
            assert types.get(tensor) not in BELOW_FP32, f"{name}: {tensor} is below fp32"


def assert_some_quantized(quantized: onnx.ModelProto, op_type: str, at_least: int) -> None:
    """The quantizer did quantize: the attention and MLP products of the 6 blocks (qkv, proj, fc1, fc2)."""
    assert sum(node.op_type == op_type for node in quantized.graph.node) >= at_least


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("int8")


@pytest.fixture(scope="module")
def all_digits() -> np.ndarray:
    """Every digit as model input: float32 [1797, 3, 32, 32]."""
    return pixels_from_digits(torch.from_numpy(digits_data()["images"].astype(np.float32))).numpy()


@pytest.fixture(scope="module")
def calibration_folder(folder) -> Path:
    """Every 15th digit (120) as an image folder root/<label>/<index>.png, the layout tome-tune reads; the
    calibration part of its split is about half of them."""
    data, root = digits_data(), folder / "calibration_digits"
    for index in range(0, len(data["labels"]), 15):
        (root / str(data["labels"][index])).mkdir(parents=True, exist_ok=True)
        pixels = np.round(data["images"][index].astype(np.float32) * 255 / 16).astype(np.uint8)  # [8, 8]
        Image.fromarray(pixels, mode="L").save(root / str(data["labels"][index]) / f"{index:04d}.png")
    return root


@pytest.fixture(scope="module")
def digits_fp32(folder) -> Path:
    """The fp32 ToMe export of the digits ViT at r=3: the reference every int8 artifact is compared with."""
    return export_model("tome_digits_vit", folder / "digits_r3.onnx", r=R, validate=False).export.path


@pytest.fixture(scope="module")
def fp32_top1(digits_fp32, all_digits) -> np.ndarray:
    return top1_onnxruntime(digits_fp32, all_digits)


def top1_onnxruntime(path: Path, pixels: np.ndarray) -> np.ndarray:
    """Class index per image ([n]) from a plain ONNX Runtime session on the file."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = [session.run(None, {"pixel_values": pixels[i : i + 512]})[0] for i in range(0, len(pixels), 512)]
    return np.concatenate(logits).argmax(1)


def export_int8(folder: Path, name: str, *flags: str) -> tuple[Path, dict]:
    """tome-export of the digits ViT at r=3 with --precision int8 and `flags`, validated; (file, JSON report)."""
    output, report = folder / name, folder / f"report_{Path(name).stem}.json"
    argv = ["tome_digits_vit", "--r", str(R), "--precision", "int8", "-o", str(output), "--report", str(report)]
    assert export_cli.main([*argv, *flags]) == 0
    return output, json.loads(report.read_text())


def calibrated_int8(digits_fp32: Path, output: Path, runtime: str, calibration_folder: Path) -> dict:
    """The shared fp32 export quantized for `runtime` as `tome-export --precision int8 --data FOLDER` does
    after exporting; the metadata written in the file, as a dict."""
    calibration = read_calibration_set(calibration_folder, load_model(ModelSource("tome_digits_vit")))
    fp32_metadata = read_metadata(digits_fp32)
    assert fp32_metadata is not None
    metadata = dataclasses.replace(fp32_metadata, precision="int8")
    written = quantize_artifact(
        digits_fp32, output, runtime=runtime, metadata=metadata, say=silent, calibration=calibration
    )
    return written.to_dict()


def assert_reports_merge_agreement(report: dict) -> None:
    verdicts = report["validation"]["checks"]
    assert verdicts and all(v["passed"] for v in verdicts)
    assert all(v["merge_agreement"] is not None for v in verdicts)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_onnxruntime_int8_keeps_matching_in_fp32_and_agrees(
    mode, folder, calibration_folder, digits_fp32, all_digits, fp32_top1
):
    output = folder / f"{mode}.onnx"
    if mode == "static":
        metadata = calibrated_int8(digits_fp32, output, "onnxruntime", calibration_folder)
    else:
        output, report = export_int8(folder, output.name, "--runtime", "onnxruntime")
        assert_reports_merge_agreement(report)
        metadata = report["metadata"]
    assert metadata["precision"] == "int8"
    if mode == "static":
        labels = [int(path.parent.name) for path in sorted(calibration_folder.glob("*/*.png"))]
        calibration_part, _ = split_indices(len(labels), labels)  # tome-tune's split: about half of each class
        assert metadata["calibration"]["count"] == len(calibration_part)
        assert metadata["calibration"]["runtime"] == "onnxruntime"
        assert len(metadata["calibration"]["data_fingerprint"]) == 64
    else:
        assert "calibration" not in metadata
    original, quantized = onnx.load(str(digits_fp32)), onnx.load(str(output))
    assert_matching_untouched(original, quantized)
    assert_some_quantized(quantized, "MatMulInteger" if mode == "dynamic" else "DequantizeLinear", 4 * MERGING_BLOCKS)
    assert float(np.mean(top1_onnxruntime(output, all_digits) == fp32_top1)) >= MIN_AGREEMENT


@pytest.mark.slow
def test_nncf_int8_ir_keeps_matching_in_fp32_and_agrees(folder, calibration_folder, digits_fp32, all_digits, fp32_top1):
    import openvino as ov

    xml = folder / "nncf.xml"
    assert calibrated_int8(digits_fp32, xml, "openvino", calibration_folder)["calibration"]["runtime"] == "openvino"
    written = ov.Core().read_model(str(xml))
    assert json.loads(written.get_rt_info()["tome_deploy"]["tome.precision"].astype(str)) == "int8"
    expected = reference_matching_nodes(onnx.load(str(digits_fp32)).graph)
    ops = {op.get_friendly_name(): op for op in written.get_ordered_ops()}
    matching = [ops[name] for name in expected if name in ops]
    assert sum(op.get_type_name() == "MatMul" for op in matching) == MERGING_BLOCKS  # the score MatMuls are there
    for op in matching:
        for port in op.inputs():
            producer = port.get_source_output().get_node()
            assert producer.get_type_name() != "FakeQuantize", f"{op.get_friendly_name()} reads a FakeQuantize"
        for port in [*op.inputs(), *op.outputs()]:
            assert port.get_element_type() not in (ov.Type.f16, ov.Type.bf16, ov.Type.i8, ov.Type.u8), op
    assert sum(op.get_type_name() == "FakeQuantize" for op in ops.values()) >= 4 * MERGING_BLOCKS
    with open_runner(xml, "openvino") as runner:  # as tome-serve and tome-validate run it
        logits = [runner.infer({"pixel_values": all_digits[i : i + 512]})["logits"] for i in range(0, 1797, 512)]
    assert float(np.mean(np.concatenate(logits).argmax(1) == fp32_top1)) >= MIN_AGREEMENT


def test_a_static_batch_takes_whole_batches_of_calibration_images(all_digits):
    image = onnx.helper.make_tensor_value_info("pixel_values", onnx.TensorProto.FLOAT, [8, 3, 32, 32])
    logits = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [8, 3, 32, 32])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["pixel_values"], ["logits"])], "g", [image], [logits]
    )
    assert [len(batch) for batch in calibration_batches(all_digits[:20], graph, 1)] == [8, 8]  # 4 left over
    with pytest.raises(InvalidInputError, match="fewer than the export's static batch of 8"):
        calibration_batches(all_digits[:5], graph, 1)
    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"  # a symbolic batch takes what it is given
    assert [len(batch) for batch in calibration_batches(all_digits[:20], graph, 8)] == [8, 8, 4]


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--precision", "int8", "--runtime", "openvino", "-o", "q.xml"], ["--data DIR", "OpenVINO"]),
        (["--precision", "int8", "--quantization", "static", "-o", "q.onnx"], ["--data DIR", "--quantization dynamic"]),
        (
            ["--precision", "int8", "--runtime", "openvino", "--quantization", "dynamic", "-o", "q.xml"],
            ["static (NNCF) only"],
        ),
        (["--precision", "int8", "--quantization", "dynamic", "--data", "d", "-o", "q.onnx"], ["drop --data"]),
        (["--data", "d", "-o", "q.onnx"], ["--data is for --precision int8"]),
    ],
)
def test_int8_options_are_one_line_errors(capsys, tmp_path, flags, fragments):
    assert export_cli.main(["tome_digits_vit", *[str(tmp_path / f) if f.startswith("q.") else f for f in flags]]) == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)


@pytest.mark.parametrize("found", ["missing", "2.19.0"])
def test_nncf_missing_or_too_old_names_the_extra(capsys, tmp_path, monkeypatch, found):
    if found == "missing":
        monkeypatch.setitem(sys.modules, "nncf", None)  # importing it raises ImportError
    else:
        versions = {"nncf": found}
        real = quantize.metadata.version
        monkeypatch.setattr(quantize.metadata, "version", lambda name: versions.get(name) or real(name))
    argv = ["tome_digits_vit", "--precision", "int8", "--runtime", "openvino", "-o", str(tmp_path / "q.xml")]
    assert export_cli.main([*argv, "--data", str(tmp_path)]) == 4
    assert_one_line_error(capsys.readouterr().err, "tome-deploy[int8]", "nncf")
