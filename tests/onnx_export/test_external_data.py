"""Models over the 2 GiB protobuf limit: the ONNX graph plus ONE external-data file beside it, written and
replaced together. A real 2 GiB export is too slow for the suite (docs/model-families.md records one); here
test_vit is written as the pair with --external-data, and a small graph crosses a lowered size limit."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import assert_one_line_error
from onnx import TensorProto, helper, numpy_helper

from tome_deploy import output_files
from tome_deploy.artifact.spec import EXPORT_SPEC
from tome_deploy.cli import export as export_cli
from tome_deploy.cli import validate as validate_cli
from tome_deploy.errors import InvalidInputError
from tome_deploy.onnx_export.export import check_onnx_output, write_onnx
from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner


def folder_state(folder: Path) -> dict[str, str]:
    """Every entry under `folder` -> the sha256 of its bytes ('dir' for a folder): temporaries show up too."""
    return {
        str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
    }


def weights(model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def locations(path: Path) -> set[str]:
    """The external-data locations the graph at `path` names, read with onnx."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {
        entry.value
        for tensor in graph.initializer
        if tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def matmul_model(seed: int):
    """[batch, 64] @ W[64, 32]: one 8 KiB weight, written in a few milliseconds."""
    w = np.random.default_rng(seed).standard_normal((64, 32)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm", [x], [y], [numpy_helper.from_array(w, "w")]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run_ort(path: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_the_export_is_a_graph_and_one_data_file_with_the_single_files_weights(external_data_export, release_export):
    path = external_data_export.export.path
    data = path.with_name("test_vit.onnx.data")
    assert sorted(p.name for p in path.parent.iterdir()) == ["test_vit.onnx", "test_vit.onnx.data"]
    assert external_data_export.external_data == data
    assert locations(path) == {"test_vit.onnx.data"}  # relative: the pair can move as a unit
    graph = onnx.load(str(path), load_external_data=False).graph
    for tensor in graph.initializer:  # weights of 1 KiB and more live in the data file; shapes and scalars inline
        nbytes = int(np.prod(tensor.dims)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        if nbytes >= 1024:
            assert tensor.data_location == TensorProto.EXTERNAL and not tensor.raw_data, tensor.name
        elif nbytes <= 64:
            assert tensor.data_location != TensorProto.EXTERNAL, tensor.name
    single = release_export("test_vit", 4, "scatter").export.path
    assert not single.with_name(single.name + ".data").exists()
    assert locations(single) == set()
    reference, paired = weights(onnx.load(str(single))), weights(onnx.load(str(path)))
    assert reference.keys() == paired.keys()
    for name, value in reference.items():
        np.testing.assert_array_equal(paired[name], value, err_msg=name)
    external_bytes = sum(v.nbytes for v in paired.values() if v.nbytes >= 1024)
    assert external_bytes <= data.stat().st_size < external_bytes + 4096 * len(paired)  # at most page alignment


def test_plain_onnxruntime_and_openvino_run_the_pair_as_the_single_file(external_data_export, release_export):
    openvino = pytest.importorskip("openvino", reason="the openvino extra is not installed")
    path = external_data_export.export.path
    single = release_export("test_vit", 4, "scatter").export.path
    x = np.random.default_rng(3).standard_normal((2, 3, 160, 160)).astype(np.float32)

    def in_ort(onnx_path: Path) -> np.ndarray:
        return ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[
            0
        ]

    def in_openvino(onnx_path: Path) -> np.ndarray:
        core = openvino.Core()
        compiled = core.compile_model(core.read_model(str(onnx_path)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return np.asarray(compiled({"pixel_values": x})[compiled.outputs[0]])

    expected = in_ort(single)
    assert expected.shape == (2, 1000)
    np.testing.assert_allclose(in_ort(path), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(in_openvino(path), in_openvino(single), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(in_openvino(path), expected, rtol=1e-3, atol=1e-4)


def test_tome_validate_passes_on_the_pair(external_data_export, capsys):
    path = external_data_export.export.path
    assert validate_cli.main(["test_vit", str(path), "--batch-sizes", "2"]) == 0
    assert "PASS" in capsys.readouterr().err


def test_the_weights_size_limit_decides_between_one_file_and_the_pair(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    size = 64 * 32 * 4  # the bytes of W
    at_limit = dataclasses.replace(EXPORT_SPEC, single_file_max_weight_bytes=size)
    one = write_onnx(matmul_model(1), check_onnx_output(tmp_path / "one.onnx"), spec=at_limit)
    below = dataclasses.replace(EXPORT_SPEC, single_file_max_weight_bytes=size - 1)
    pair = write_onnx(matmul_model(1), check_onnx_output(tmp_path / "pair.onnx"), spec=below)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.onnx", "pair.onnx", "pair.onnx.data"]
    assert locations(one) == set() and locations(pair) == {"pair.onnx.data"}
    np.testing.assert_array_equal(run_ort(pair, x), run_ort(one, x))
    np.testing.assert_allclose(run_ort(pair, x), x @ weights(matmul_model(1))["w"], rtol=1e-5, atol=1e-5)


def test_a_pair_replaces_the_previous_pair_and_a_single_file_removes_its_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where onnx.save_model would look for (and refuse) an existing out.onnx.data
    x = np.ones((1, 64), np.float32)
    out = tmp_path / "out.onnx"
    write_onnx(matmul_model(1), check_onnx_output(out), external_data=True)
    first = run_ort(out, x)
    write_onnx(matmul_model(2), check_onnx_output(out), external_data=True)  # the previous version's data: ours
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    second = run_ort(out, x)
    np.testing.assert_allclose(second, x @ weights(matmul_model(2))["w"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(first, second)
    write_onnx(matmul_model(3), check_onnx_output(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]  # no stale weights left behind
    np.testing.assert_allclose(run_ort(out, x), x @ weights(matmul_model(3))["w"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_a_folder_or_fifo_where_the_data_file_goes_is_refused_and_kept(tmp_path, kind):
    foreign = tmp_path / "out.onnx.data"
    foreign.mkdir() if kind == "folder" else os.mkfifo(foreign)
    with pytest.raises(InvalidInputError, match="out.onnx.data exists and is not the external data of"):
        check_onnx_output(tmp_path / "out.onnx")
    assert foreign.is_dir() if kind == "folder" else stat.S_ISFIFO(foreign.stat().st_mode)


def test_a_data_file_that_is_not_the_outputs_is_refused_and_kept(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    foreign = tmp_path / "out.onnx.data"
    foreign.write_bytes(b"someone else's weights")
    with pytest.raises(InvalidInputError, match="is not the external data of"):
        check_onnx_output(out)
    out.write_bytes(matmul_model(1).SerializeToString())  # a single-file model does not name it either
    before = folder_state(tmp_path)
    assert export_cli.main(["test_vit", "--r", "4", "-o", str(out), "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, "out.onnx.data exists and is not the external data", "move")
    assert folder_state(tmp_path) == before


def test_a_stop_while_the_pair_is_checked_leaves_the_previous_pair(tmp_path, monkeypatch):
    """Ctrl-C (SIGTERM, SIGHUP: the CLIs raise the same interrupt) once both files are written, staged."""
    out = tmp_path / "out.onnx"
    write_onnx(matmul_model(1), check_onnx_output(out), external_data=True)
    before = folder_state(tmp_path)
    check = onnx.checker.check_model

    def stopped(path, *args, **kwargs):
        staged = Path(path)
        assert staged.name == "out.onnx" and staged.parent != tmp_path
        assert staged.with_name("out.onnx.data").stat().st_size == 64 * 32 * 4  # both written, staged
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx.checker, "check_model", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_onnx(matmul_model(2), check_onnx_output(out), external_data=True)
    monkeypatch.setattr(onnx.checker, "check_model", check)
    assert folder_state(tmp_path) == before  # the previous pair, byte for byte, and no staging folder
    output_files.discard_temporaries()


def test_a_failed_rename_puts_the_previous_pair_back(tmp_path, monkeypatch):
    """The data file is renamed in first; when the graph's rename then fails, the previous data comes back."""
    out = tmp_path / "out.onnx"
    write_onnx(matmul_model(1), check_onnx_output(out), external_data=True)
    before = folder_state(tmp_path)
    replace = output_files.os.replace

    def graph_rename_fails(source, target):
        if Path(target) == out:
            assert Path(out.with_name("out.onnx.data")).stat().st_size > 0  # the new data is already in place
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(output_files.os, "replace", graph_rename_fails)
    with pytest.raises(InvalidInputError, match="No space left on device"):
        write_onnx(matmul_model(2), check_onnx_output(out), external_data=True)
    assert folder_state(tmp_path) == before


def test_a_plugin_graph_with_external_data_runs_in_onnx_runtime(export_cached, tmp_path):
    """A --merge plugin graph reaches ONNX Runtime as rewritten bytes of the graph alone; the weights stay in
    their file, whose folder the session is told (a model over 2 GiB never becomes one message)."""
    single = export_cached("vit_class_token", "plugin").path
    pair = write_onnx(onnx.load(str(single)), check_onnx_output(tmp_path / "plugin.onnx"), external_data=True)
    assert locations(pair) == {"plugin.onnx.data"}
    x = np.random.default_rng(5).standard_normal((2, 3, 160, 160)).astype(np.float32)
    with OnnxRuntimeRunner(single) as one, OnnxRuntimeRunner(pair) as two:
        expected = one.infer({"pixel_values": x})["logits"]
        np.testing.assert_allclose(two.infer({"pixel_values": x})["logits"], expected, rtol=1e-6, atol=1e-6)
