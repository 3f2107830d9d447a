"""Side-by-side CPU timing (ONNX Runtime or OpenVINO): runs alternate between models so machine noise hits both alike."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from tome_deploy.runtime.choice import cpu_runner


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
    runners = {name: cpu_runner(runtime, path, threads=threads) for name, path in models.items()}
    feed = {input_name: np.random.default_rng(0).standard_normal((batch, *input_shape)).astype(np.float32)}
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for round_index in range(warmup + rounds):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.infer(feed)
            if round_index >= warmup:
                samples[name].append(time.perf_counter() - start)
    return {name: Timing(name, batch, statistics.median(values)) for name, values in samples.items()}
