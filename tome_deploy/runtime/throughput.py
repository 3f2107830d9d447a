"""Side-by-side timing, the one timing loop of the package and its benchmarks: runs alternate between models so
machine noise hits all alike (ONNX Runtime or OpenVINO files, or any calls, GPU work included)."""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from tome_deploy.runtime.factory import open_runner


@dataclass(frozen=True)
class Timing:
    name: str
    batch: int
    median_s: float  # per forward pass

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s


def time_interleaved(
    models: dict[str, str | Path],
    input_name: str,
    input_shape: Sequence[int],
    batch: int,
    *,
    rounds: int = 10,
    warmup: int = 2,
    threads: int | None = None,
    runtime: str = "onnxruntime",
) -> dict[str, Timing]:
    """Median latency per model over `rounds`, each round running every model once in turn."""
    feed = {input_name: np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)}
    with contextlib.ExitStack() as active:
        runners = {
            name: active.enter_context(open_runner(path, runtime, threads=threads)) for name, path in models.items()
        }
        medians = time_side_by_side(
            {name: functools.partial(runner.infer, feed) for name, runner in runners.items()},
            rounds=rounds,
            warmup=warmup,
        )
    return {name: Timing(name, batch, median) for name, median in medians.items()}


def time_side_by_side(
    runs: dict[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 1,
    iterations: int = 1,
    sync: Optional[Callable[[], None]] = None,
) -> dict[str, float]:
    """Median seconds per call of each entry; each round calls every entry `iterations` times in a row, in
    turn, so machine noise hits all alike; the first `warmup` rounds are not counted. sync: waits for work
    the calls only queued (e.g. torch.cuda.synchronize for GPU work); called before the clock starts and
    before it stops, so each sample holds exactly its own calls."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(warmup + rounds):
        for name, run in runs.items():
            if sync is not None:
                sync()
            start = time.perf_counter()
            for _ in range(iterations):
                run()
            if sync is not None:
                sync()
            if round_index >= warmup:
                samples[name].append((time.perf_counter() - start) / iterations)
    return {name: statistics.median(values) for name, values in samples.items()}
