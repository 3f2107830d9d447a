"""Engines as serving artifacts: a real TensorRT-RTX engine built on CPU (ahead of time, SM89) is described
from its sidecar and source ONNX, refused by Triton's TensorRT backend with the fix, and `tome-serve`
dispatches it to the TensorRT runner (which needs a GPU and a TensorRT runtime, and says so)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import onnx
import pytest
import torch
from conftest import assert_one_line_error
from google.protobuf import text_format
from test_triton_repo import triton_model_config_schema

from tome_deploy.cli import deploy as deploy_cli
from tome_deploy.cli import serve as serve_cli
from tome_deploy.errors import InvalidInputError
from tome_deploy.serving.served_model import read_served_model
from tome_deploy.serving.triton_repo import TritonOptions, model_config, render_pbtxt

pytestmark = pytest.mark.tensorrt

pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX (the tensorrt-rtx extra) builds the test engine")


@pytest.fixture(scope="module")
def engine(export_cached, tmp_path_factory):
    from tome_deploy.tensorrt.build import BuildOptions, build_engine

    onnx_path = export_cached("vit_class_token", merge="matmul").path
    plan = tmp_path_factory.mktemp("engine") / "vit.plan"
    build_engine(onnx_path, plan, BuildOptions(backend="tensorrt-rtx", compute_capability="89", max_batch=4))
    return plan, onnx_path


def test_engine_is_described_by_its_sidecar(engine):
    plan, onnx_path = engine
    served_model = read_served_model(plan)
    graph = onnx.load(str(onnx_path)).graph
    assert served_model.kind == "engine" and served_model.engine_backend == "tensorrt-rtx"
    assert served_model.max_batch == 4 and served_model.fixed_batch is None
    assert [(t.name, t.shape) for t in served_model.inputs] == [(graph.input[0].name, (-1, 3, 160, 160))]
    assert [(t.name, t.shape, t.datatype) for t in served_model.outputs] == [(graph.output[0].name, (-1, 1000), "FP32")]
    assert served_model.metadata.merge == "matmul" and served_model.metadata.tokens_per_layer == [
        101 - 8 * i for i in range(7)
    ]


def test_engine_config_for_full_tensorrt_is_a_batched_gpu_plan(engine):
    served_model = dataclasses.replace(
        read_served_model(engine[0]), engine_backend="tensorrt"
    )  # the config a full-TensorRT build gets
    schema = triton_model_config_schema()
    config = text_format.Parse(render_pbtxt(model_config(served_model, TritonOptions("vit"))), schema.ModelConfig())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 4  # the profile maximum
    assert list(config.input[0].dims) == [3, 160, 160] and list(config.output[0].dims) == [1000]
    assert config.instance_group[0].kind == schema.ModelInstanceGroup.KIND_GPU


def test_triton_repo_refuses_rtx_engine_and_too_large_batch(engine, tmp_path, capsys):
    plan, _ = engine
    assert deploy_cli.main(["triton-repo", str(plan), str(tmp_path / "repo")]) == 2
    assert_one_line_error(capsys.readouterr().err, "built by tensorrt-rtx", "--backend tensorrt")
    with pytest.raises(InvalidInputError, match="over the engine's profile maximum 4"):
        model_config(
            dataclasses.replace(read_served_model(plan), engine_backend="tensorrt"), TritonOptions("vit", max_batch=8)
        )


def test_engine_is_described_without_its_source_onnx(engine, tmp_path):
    """Moved to another machine without the ONNX file: the sidecar alone describes the engine."""
    plan, onnx_path = engine
    moved = tmp_path / "vit.plan"
    moved.write_bytes(plan.read_bytes())
    sidecar = plan.with_name(plan.name + ".json").read_text()
    (tmp_path / "vit.plan.json").write_text(sidecar.replace(str(onnx_path.resolve()), str(tmp_path / "gone.onnx")))
    original, relocated = read_served_model(plan), read_served_model(moved)
    assert (relocated.inputs, relocated.outputs, relocated.metadata) == (
        original.inputs,
        original.outputs,
        original.metadata,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the engine may run")
def test_serving_an_engine_without_a_gpu_says_so(engine, capsys):
    assert serve_cli.main([str(engine[0]), "--port", "0"]) == 2
    assert_one_line_error(capsys.readouterr().err, "needs a CUDA GPU")


WITHOUT_TENSORRT = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorrt", "tensorrt_rtx_bindings", "tensorrt_rtx_libs"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Blocked())
from tome_deploy.cli import serve
sys.exit(serve.main([sys.argv[1], "--port", "0"]))
"""


def test_serving_an_engine_without_tensorrt_is_a_missing_dependency(engine):
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORRT, str(engine[0])], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 4, result.stderr
    assert_one_line_error(result.stderr, "no TensorRT backend is importable")
