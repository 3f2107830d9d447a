"""The dynamic batcher on its own: a plain numpy function stands in for the model, whose arithmetic the
tests redo independently (each row's output is its own input doubled plus its row sum)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from tome_deploy.errors import InvalidInputError
from tome_deploy.serving import batcher as batcher_module
from tome_deploy.serving.batcher import (
    BatchPolicy,
    DynamicBatcher,
    InferenceFailedError,
    RequestTimeoutError,
    ServerBusyError,
    concatenate,
    split,
)


class RecordingModel:
    """Computes y = 2x + sum(x) per row; records each batch's row count; can be held at a gate."""

    def __init__(self, gated: bool = False):
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.entered = threading.Event()
        if not gated:
            self.gate.set()

    def __call__(self, feed):
        self.entered.set()
        assert self.gate.wait(10), "test gate never opened"
        x = feed["x"]  # [n, 4]
        self.batches.append(len(x))
        return {"y": 2 * x + x.sum(axis=1, keepdims=True)}


def expected(x: np.ndarray) -> np.ndarray:
    return np.stack([row * 2 + sum(row.tolist()) for row in x])


def rows(seed: int, n: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


async def until(condition, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never became true")


def test_concatenate_then_split_gives_each_request_its_rows():
    feeds = [{"x": rows(i, n)} for i, n in enumerate([1, 3, 2])]
    merged = concatenate(feeds)
    assert merged["x"].shape == (6, 4)
    for feed, part in zip(feeds, split(merged, [1, 3, 2])):
        np.testing.assert_array_equal(part["x"], feed["x"])


def test_concurrent_requests_are_batched_and_answered_with_their_own_rows():
    model = RecordingModel()

    async def scenario():
        batcher = DynamicBatcher(model, BatchPolicy(max_batch=8, max_delay_s=0.05, max_queue=100))
        batcher.start()
        inputs = [rows(seed, n) for seed, n in enumerate([1, 2, 1, 3] * 10)]
        results = await asyncio.gather(*(batcher.infer({"x": x}) for x in inputs))
        await batcher.drain()
        return inputs, results

    inputs, results = asyncio.run(scenario())
    for x, result in zip(inputs, results):
        np.testing.assert_allclose(result["y"], expected(x), rtol=1e-5, atol=1e-6)
    assert sum(model.batches) == sum(len(x) for x in inputs)
    assert max(model.batches) > 1 and max(model.batches) <= 8
    assert len(model.batches) < len(inputs)


def test_batch_is_stacked_run_and_split_in_the_inference_thread_not_on_the_event_loop(monkeypatch):
    threads: dict[str, set[str]] = {"concatenate": set(), "split": set(), "model": set()}

    def recorded(label, function):
        def run(*args):
            threads[label].add(threading.current_thread().name)
            return function(*args)

        return run

    monkeypatch.setattr(batcher_module, "concatenate", recorded("concatenate", concatenate))
    monkeypatch.setattr(batcher_module, "split", recorded("split", split))
    model = recorded("model", RecordingModel())

    async def scenario():
        batcher = DynamicBatcher(model, BatchPolicy(max_batch=4, max_delay_s=0.05))
        batcher.start()
        inputs = [rows(seed, n) for seed, n in enumerate([1, 2, 1])]
        results = await asyncio.gather(*(batcher.infer({"x": x}) for x in inputs))
        await batcher.drain()
        return inputs, results, threading.current_thread().name

    inputs, results, loop_thread = asyncio.run(scenario())
    for x, result in zip(inputs, results):
        np.testing.assert_allclose(result["y"], expected(x), rtol=1e-5, atol=1e-6)
    assert threads == {"concatenate": {"tome-infer_0"}, "split": {"tome-infer_0"}, "model": {"tome-infer_0"}}
    assert loop_thread != "tome-infer_0"


def test_request_larger_than_max_batch_is_refused():
    async def scenario():
        batcher = DynamicBatcher(RecordingModel(), BatchPolicy(max_batch=4))
        batcher.start()
        try:
            with pytest.raises(InvalidInputError, match="1 to 4"):
                await batcher.infer({"x": rows(0, 5)})
        finally:
            await batcher.drain()

    asyncio.run(scenario())


def test_full_queue_refuses_then_everything_queued_completes():
    model = RecordingModel(gated=True)

    async def scenario():
        batcher = DynamicBatcher(model, BatchPolicy(max_batch=1, max_delay_s=0, max_queue=2))
        batcher.start()
        running = asyncio.ensure_future(batcher.infer({"x": rows(0)}))
        await until(model.entered.is_set)  # the worker holds request 0 at the gate
        queued = [asyncio.ensure_future(batcher.infer({"x": rows(seed)})) for seed in (1, 2)]
        await until(lambda: batcher.queued == 2)
        with pytest.raises(ServerBusyError, match="queue is full"):
            await batcher.infer({"x": rows(3)})
        model.gate.set()
        results = await asyncio.gather(running, *queued)
        await batcher.drain()
        return results

    results = asyncio.run(scenario())
    for seed, result in enumerate(results):
        np.testing.assert_allclose(result["y"], expected(rows(seed)), rtol=1e-5, atol=1e-6)
    assert model.batches == [1, 1, 1]


def test_timed_out_request_is_answered_with_timeout_and_never_computed():
    model = RecordingModel(gated=True)

    async def scenario():
        batcher = DynamicBatcher(model, BatchPolicy(max_batch=1, max_delay_s=0, max_queue=4, timeout_s=30))
        batcher.start()
        running = asyncio.ensure_future(batcher.infer({"x": rows(0)}))
        await until(model.entered.is_set)
        with pytest.raises(RequestTimeoutError, match="did not finish within 0.05s"):
            await batcher.infer({"x": rows(1)}, timeout_s=0.05)
        assert batcher.queued == 0  # the timed-out request left the queue
        model.gate.set()
        await running
        await batcher.drain()

    asyncio.run(scenario())
    assert model.batches == [1]


def test_drain_finishes_queued_requests_and_refuses_new_ones():
    model = RecordingModel(gated=True)

    async def scenario():
        batcher = DynamicBatcher(model, BatchPolicy(max_batch=2, max_delay_s=0, max_queue=10))
        batcher.start()
        pending = [asyncio.ensure_future(batcher.infer({"x": rows(seed)})) for seed in range(5)]
        await until(model.entered.is_set)
        draining = asyncio.ensure_future(batcher.drain())
        await asyncio.sleep(0)
        with pytest.raises(ServerBusyError, match="shutting down"):
            await batcher.infer({"x": rows(9)})
        model.gate.set()
        results = await asyncio.gather(*pending)
        await draining
        return results

    results = asyncio.run(scenario())
    for seed, result in enumerate(results):
        np.testing.assert_allclose(result["y"], expected(rows(seed)), rtol=1e-5, atol=1e-6)
    assert sum(model.batches) == 5


def test_model_failure_fails_its_batch_only():
    calls = []

    def flaky(feed):
        calls.append(len(feed["x"]))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"y": feed["x"] * 2}

    async def scenario():
        batcher = DynamicBatcher(flaky, BatchPolicy(max_batch=4, max_delay_s=0))
        batcher.start()
        with pytest.raises(InferenceFailedError, match="boom"):
            await batcher.infer({"x": rows(0)})
        result = await batcher.infer({"x": rows(1)})
        await batcher.drain()
        return result

    np.testing.assert_array_equal(asyncio.run(scenario())["y"], rows(1) * 2)
