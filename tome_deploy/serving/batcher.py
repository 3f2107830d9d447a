"""Dynamic batching: concurrent requests wait in a bounded queue and run together as one batch.

A batch closes when its rows reach `max_batch` or when its oldest request has waited `max_delay_s`.
The batch runs on one inference thread (OS name "tome-infer"), which also stacks the requests' rows into
the batch and cuts the output back per request: the event loop copies no tensor, so it keeps receiving
requests and answering health checks and metrics while the model computes. Every request gets back
exactly its own rows of the batch output.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from tome_deploy.errors import InvalidInputError, ToMeError
from tome_deploy.serving.threads import named_executor

Feed = dict[str, np.ndarray]
RunBatch = Callable[[Feed], Feed]


class ServerBusyError(ToMeError):
    """The queue is full or the server is draining; the client should retry later (HTTP 503)."""


class RequestTimeoutError(ToMeError):
    """A request did not finish within its timeout (HTTP 504)."""


class InferenceFailedError(ToMeError):
    """The model raised while running a batch (HTTP 500)."""

    exit_code = 3


@dataclass(frozen=True)
class BatchPolicy:
    max_batch: int = 8  # rows per model call
    max_delay_s: float = 0.005  # how long the oldest queued request may wait for others
    max_queue: int = 64  # requests waiting (not yet running); one more is refused
    timeout_s: float = 30.0  # default per-request limit, queue wait + compute

    def __post_init__(self):
        if self.max_batch < 1 or self.max_queue < 1:
            raise InvalidInputError(
                f"max batch ({self.max_batch}) and max queue ({self.max_queue}) must be >= 1; pass positive values"
            )
        if (
            not (math.isfinite(self.max_delay_s) and math.isfinite(self.timeout_s))
            or self.max_delay_s < 0
            or self.timeout_s <= 0
        ):
            raise InvalidInputError(
                f"max delay ({self.max_delay_s}s) must be >= 0 and timeout ({self.timeout_s}s) > 0; pass valid values"
            )


@dataclass(frozen=True)
class BatchRecord:
    """What one model call did, for metrics."""

    rows: int
    requests: int
    queue_s: tuple[float, ...]  # per request: enqueue -> batch start
    compute_s: float


@dataclass(eq=False)
class _Pending:
    feed: Feed
    rows: int
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


def concatenate(feeds: list[Feed]) -> Feed:
    """Stack the requests' inputs along the batch axis: k feeds of [n_i, ...] -> one of [sum n_i, ...]."""
    return {name: np.concatenate([feed[name] for feed in feeds]) for name in feeds[0]}


def split(outputs: Feed, rows: list[int]) -> list[Feed]:
    """The inverse of `concatenate` for the outputs: [sum n_i, ...] -> one [n_i, ...] dict per request."""
    bounds = np.cumsum(rows)[:-1]
    per_name = {name: np.split(value, bounds) for name, value in outputs.items()}
    return [{name: parts[i] for name, parts in per_name.items()} for i in range(len(rows))]


class DynamicBatcher:
    """Use from one event loop: `start()`, then `await infer(feed)`, and `await drain()` at shutdown."""

    def __init__(
        self, run_batch: RunBatch, policy: BatchPolicy, on_batch: Optional[Callable[[BatchRecord], None]] = None
    ):
        self.policy, self._run_batch, self._on_batch = policy, run_batch, on_batch
        self._queue: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._executor = named_executor("tome-infer", max_workers=1)
        self._worker: Optional[asyncio.Task] = None
        self._draining = False

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def accepting(self) -> bool:
        return self._worker is not None and not self._draining

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._serve_forever())

    async def infer(self, feed: Feed, timeout_s: Optional[float] = None) -> Feed:
        """Queue one request of n rows (n <= max_batch) and wait for its n rows of output."""
        rows = len(next(iter(feed.values())))
        if not 1 <= rows <= self.policy.max_batch:
            raise InvalidInputError(f"a request has {rows} rows; send 1 to {self.policy.max_batch} per request")
        if not self.accepting:
            raise ServerBusyError("the server is shutting down; retry on another instance")
        if len(self._queue) >= self.policy.max_queue:
            raise ServerBusyError(
                f"the queue is full ({self.policy.max_queue} requests waiting); retry later or raise --max-queue"
            )
        pending = _Pending(feed, rows, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        self._arrived.set()
        limit = self.policy.timeout_s if timeout_s is None else min(timeout_s, self.policy.timeout_s)
        try:
            # shield: a timeout must not cancel the future the worker will resolve
            return await asyncio.wait_for(asyncio.shield(pending.future), limit)
        except asyncio.TimeoutError:
            if pending in self._queue:
                self._queue.remove(pending)  # never started: nobody computes it
            raise RequestTimeoutError(
                f"the request did not finish within {limit:g}s; retry, send smaller batches, or raise the timeout"
            ) from None

    async def drain(self) -> None:
        """Refuse new requests, finish every queued and running one, then stop the worker thread."""
        self._draining = True
        self._arrived.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    async def _serve_forever(self) -> None:
        while True:
            if not self._queue:
                if self._draining:
                    return
                self._arrived.clear()
                await self._arrived.wait()
                continue
            batch = await self._collect()
            if batch:
                await self._execute(batch)

    async def _collect(self) -> list[_Pending]:
        """Wait until max_batch rows are queued, the oldest request's delay is over, or we drain."""
        while self._queue and not self._draining:
            waited = time.perf_counter() - self._queue[0].enqueued
            if sum(p.rows for p in self._queue) >= self.policy.max_batch or waited >= self.policy.max_delay_s:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), self.policy.max_delay_s - waited)
            except asyncio.TimeoutError:
                pass
        batch, rows = [], 0
        while self._queue and rows + self._queue[0].rows <= self.policy.max_batch:
            pending = self._queue.popleft()
            batch.append(pending)
            rows += pending.rows
        return batch

    def _compute(self, feeds: list[Feed], rows: list[int]) -> list[Feed]:
        """In the inference thread: stack the requests into one batch, run it, give each request its rows."""
        return split(self._run_batch(concatenate(feeds)), rows)

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._compute, [p.feed for p in batch], [p.rows for p in batch]
            )
        except Exception as err:  # noqa: BLE001 - the model's own error types vary by backend
            failure = InferenceFailedError(
                f"the model failed on a batch of {sum(p.rows for p in batch)}: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            )
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(failure)
            return
        compute_s = time.perf_counter() - started
        for pending, result in zip(batch, results):
            if not pending.future.done():
                pending.future.set_result(result)
        if self._on_batch is not None:
            self._on_batch(
                BatchRecord(
                    sum(p.rows for p in batch), len(batch), tuple(started - p.enqueued for p in batch), compute_s
                )
            )
