"""The runner lifecycle (activate, infer, deactivate), the one runner factory, and the timing loop every
speed measurement goes through (runtime/throughput.py)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from tome_deploy.artifact.sidecar import EngineMismatchError
from tome_deploy.errors import InvalidInputError
from tome_deploy.runtime import throughput
from tome_deploy.runtime.base import RunnerStateError
from tome_deploy.runtime.factory import open_runner
from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner
from tome_deploy.runtime.openvino import OpenVINORunner
from tome_deploy.runtime.throughput import time_interleaved, time_side_by_side


@pytest.fixture(scope="module")
def exported(export_cached):
    return export_cached("vit_class_token", "scatter")  # test_vit, dynamic batch


def feed_for(exported, batch: int = 2) -> dict[str, np.ndarray]:
    shape = (batch, *exported.metadata.input.shape)
    return {exported.metadata.input.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}


def test_a_runner_infers_only_while_active(exported):
    runner = OnnxRuntimeRunner(exported.path)
    assert not runner.is_active and runner.session is None  # constructed: nothing loaded yet
    with pytest.raises(RunnerStateError, match=r"onnxruntime runner is not active; call activate\(\) first"):
        runner.infer(feed_for(exported))
    with runner:
        assert runner.is_active
        logits = runner.infer(feed_for(exported))[exported.metadata.output_name]
        assert logits.shape[0] == 2
        with pytest.raises(RunnerStateError, match="already active"):
            runner.activate()
    assert not runner.is_active and runner.session is None  # released
    with pytest.raises(RunnerStateError, match="not active"):
        runner.infer(feed_for(exported))
    with pytest.raises(RunnerStateError, match="nothing to deactivate"):
        runner.deactivate()
    runner.activate()  # a released runner loads again, and answers the same
    np.testing.assert_array_equal(runner.infer(feed_for(exported))[exported.metadata.output_name], logits)
    runner.deactivate()


def test_leaving_the_with_block_on_an_error_deactivates(exported):
    runner = OnnxRuntimeRunner(exported.path)
    with pytest.raises(KeyError):
        with runner:
            runner.infer({"not_the_input": np.zeros(1, np.float32)})
    assert not runner.is_active


def test_the_factory_picks_the_runner_for_the_runtime_and_file_kind(exported, tmp_path):
    onnx_runner = open_runner(exported.path)
    assert isinstance(onnx_runner, OnnxRuntimeRunner) and not onnx_runner.is_active
    assert isinstance(open_runner(exported.path, "openvino"), OpenVINORunner)
    engine = tmp_path / "model.plan"
    engine.write_bytes(b"not an engine")
    with pytest.raises(
        EngineMismatchError, match="has no sidecar"
    ):  # an engine goes to TensorRT, which checks its sidecar
        open_runner(engine)


@pytest.mark.parametrize(
    "path, runtime, options, message",
    [
        ("model.onnx", "tensorflow", {}, "unknown runtime 'tensorflow'; choose one of onnxruntime, openvino"),
        ("model.xml", "onnxruntime", {}, "OpenVINO IR, which only OpenVINO runs; pass --runtime openvino"),
        (
            "model.onnx",
            "openvino",
            {"providers": ("CUDAExecutionProvider",)},
            "runs ONNX files on the CPU; drop --device/--providers",
        ),
        ("model.plan", "openvino", {}, "an engine runs in TensorRT: drop --runtime"),
        (
            "model.plan",
            "onnxruntime",
            {"threads": 2},
            "apply to ONNX files; an engine runs on the GPU it was built for, drop them",
        ),
    ],
)
def test_the_factory_refuses_what_cannot_run_with_the_fix(tmp_path, path, runtime, options, message):
    with pytest.raises(InvalidInputError, match=message):
        open_runner(tmp_path / path, runtime, **options)


def test_timing_waits_for_queued_work_inside_the_clock(monkeypatch):
    """GPU calls only queue their work; `sync` waits for it. Each sample must hold its own queued work and
    nothing queued before it: here each call queues 1 ms that only sync 'runs', on a clock that only sync
    advances (no wall time is read, so a loaded machine cannot change the result)."""
    queued = {"ms": 0}
    clock = {"s": 0.0}
    syncs = []

    def enqueue() -> None:
        queued["ms"] += 1

    def sync() -> None:
        syncs.append(queued["ms"])
        clock["s"] += queued["ms"] / 1000
        queued["ms"] = 0

    monkeypatch.setattr(throughput, "time", types.SimpleNamespace(perf_counter=lambda: clock["s"]))
    seconds = time_side_by_side({"a": enqueue, "b": enqueue}, rounds=3, warmup=1, iterations=5, sync=sync)
    assert len(syncs) == 2 * 4 * 2  # before and after each sample, warm-up round included
    assert syncs[0::2] == [0] * 8 and syncs[1::2] == [5] * 8
    assert seconds == pytest.approx({"a": 0.001, "b": 0.001})  # 5 ms of queued work over 5 calls, nothing else


def test_interleaved_timing_runs_each_file_through_the_factory(exported):
    timings = time_interleaved(
        {"tome": exported.path}, exported.metadata.input.name, exported.metadata.input.shape, 2, rounds=2, warmup=1
    )
    assert timings["tome"].batch == 2 and timings["tome"].images_per_s > 0
