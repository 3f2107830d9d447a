"""Prometheus metrics of one server, in a registry of its own (several servers can share a process)."""

from __future__ import annotations

from typing import Callable

from tome_deploy.serving.batcher import BatchRecord

LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
EXACT_BATCH_SIZES = 16  # up to this many rows every batch size has its own bucket


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Every size 1..16 (the histogram then counts each batch size exactly, as Triton's batch statistics
    do), then 32, 64, ... below max_batch, and max_batch itself, so a full batch has its own bucket."""
    sizes = list(range(1, min(max_batch, EXACT_BATCH_SIZES + 1)))
    size = 2 * EXACT_BATCH_SIZES
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return (*sizes, max_batch)


class ServingMetrics:
    def __init__(self, max_batch: int, queue_depth: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "tome_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "tome_request_seconds",
            "Time from request to response of infer and classify calls",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "tome_batch_size",
            "Rows per model call (dynamic batching)",
            buckets=batch_buckets(max_batch),
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "tome_queue_seconds",
            "Time a request waited in the queue before its batch ran",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "tome_compute_seconds", "Model time per batch", buckets=LATENCY_BUCKETS_S, registry=self.registry
        )
        Gauge("tome_queue_depth", "Requests waiting in the queue now", registry=self.registry).set_function(queue_depth)

    def record_batch(self, record: BatchRecord) -> None:
        self.batch_size.observe(record.rows)
        self.compute_seconds.observe(record.compute_s)
        for waited in record.queue_s:
            self.queue_seconds.observe(waited)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
