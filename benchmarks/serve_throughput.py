"""Served throughput and latency of `tome-serve`: dynamic batching vs batch-1 serving, ToMe vs unmerged.

Exports the unmerged ViT and its ToMe version (same random weights), starts four `tome-serve` processes
(each model with `--max-batch 1` and with dynamic batching up to `--max-batch`), then, for each
concurrency level, drives them in turn with closed-loop `tritonclient.http` clients (binary tensors),
interleaved over `--rounds` rounds so machine noise hits all four alike. Throughput is completed
requests (one image each) per second of wall time (median over rounds); p50/p99 are client-side
latencies pooled over the rounds; "mean batch" is what the server's batcher formed (from /metrics).

    python benchmarks/serve_throughput.py                  # ViT-S/16 r=16 vs r=0, concurrency 1,4,16: ~4 min on 2 cores
    python benchmarks/serve_throughput.py --concurrency 8 --requests 96 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import tritonclient.http as triton_http
from common import (
    BASELINE,
    SCHEDULES,
    export_variants,
    markdown_table,
    whole_numbers,
    write_json,
)

MODEL_NAME = "vit"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--schedule", default="r=16", choices=list(SCHEDULES))
    parser.add_argument("--concurrency", default="1,4,16", help="client counts, comma-separated")
    parser.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per measurement (default: 8 x concurrency, at least 16, at most 64)",
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-batch", type=int, default=8, help="dynamic batching limit")
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser.parse_args()


class ServerProcess:
    """One `tome-serve` on a free loopback port."""

    def __init__(self, path: Path, max_batch: int, max_delay_ms: float, extra_args: tuple[str, ...] = ()):
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tome_deploy.cli.serve",
                str(path),
                "--port",
                "0",
                "--name",
                MODEL_NAME,
                "--max-batch",
                str(max_batch),
                "--max-delay-ms",
                str(max_delay_ms),
                "--max-queue",
                "1024",
                "--timeout-s",
                "600",
                *extra_args,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.process.stderr.readline()
        if "http://" not in line:
            self.process.kill()
            raise SystemExit(f"tome-serve did not start: {line}{self.process.stderr.read()}")
        self.url = line.rsplit("http://", 1)[1].strip()
        threading.Thread(target=self.process.stderr.read, daemon=True).start()  # keep the pipe drained

    def batches(self) -> tuple[float, float]:
        """(rows, batches) the server has run so far, from its Prometheus metrics."""
        import urllib.request

        text = urllib.request.urlopen(f"http://{self.url}/metrics", timeout=30).read().decode()
        values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("tome_batch_size_"))
        return float(values["tome_batch_size_sum"]), float(values["tome_batch_size_count"])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def drive(url: str, images: np.ndarray, concurrency: int, requests: int) -> tuple[float, list[float]]:
    """Closed loop: `concurrency` clients send one image each until `requests` are answered. (seconds, latencies)"""
    latencies: list[float] = []
    next_index = iter(range(requests))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client_loop() -> None:
        client = triton_http.InferenceServerClient(url, network_timeout=600)
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                return
            x = images[index % len(images)][None]
            tensor = triton_http.InferInput("pixel_values", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            start = time.perf_counter()
            try:
                client.infer(MODEL_NAME, [tensor])
            except BaseException as err:  # noqa: BLE001 - surfaced in the main thread
                errors.append(err)
                return
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client_loop) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    return time.perf_counter() - start, latencies


def main() -> None:
    args = parse_args()
    levels = whole_numbers(args.concurrency)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = export_variants(args.model, {args.schedule: SCHEDULES[args.schedule]}, Path(tmp), merge="scatter")
        paths = {label: outcome.export.path for label, outcome in outcomes.items()}
        input_shape = outcomes[BASELINE].export.metadata.input.shape
        images = np.random.default_rng(0).standard_normal((64, *input_shape)).astype(np.float32)
        configs = {
            (label, mode): (path, 1 if mode == "batch-1" else args.max_batch)
            for label, path in paths.items()
            for mode in ("batch-1", "dynamic")
        }
        servers = {key: ServerProcess(path, max_batch, args.max_delay_ms) for key, (path, max_batch) in configs.items()}
        try:
            for server in servers.values():  # warm up: ONNX Runtime allocates on the first calls of each batch size
                drive(server.url, images, args.max_batch, 2 * args.max_batch)
            for concurrency in levels:
                requests = args.requests or min(64, max(16, 8 * concurrency))
                seconds = {key: [] for key in servers}
                latencies = {key: [] for key in servers}
                batch_before = {key: server.batches() for key, server in servers.items()}
                for _ in range(args.rounds):
                    for key, server in servers.items():
                        took, lat = drive(server.url, images, concurrency, requests)
                        seconds[key].append(took)
                        latencies[key] += lat
                for key, server in servers.items():
                    rows_after, batches_after = server.batches()
                    label, mode = key
                    throughput = requests / statistics.median(seconds[key])
                    rows.append(
                        {
                            "model": args.model,
                            "schedule": label,
                            "serving": mode,
                            "concurrency": concurrency,
                            "requests": requests,
                            "rounds": args.rounds,
                            "img_s": throughput,
                            "p50_ms": 1000 * float(np.percentile(latencies[key], 50)),
                            "p99_ms": 1000 * float(np.percentile(latencies[key], 99)),
                            "mean_batch": (rows_after - batch_before[key][0])
                            / max(1.0, batches_after - batch_before[key][1]),
                        }
                    )
                    print(
                        f"  concurrency {concurrency:>2} {label:<9} {mode:<8} {throughput:6.1f} img/s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()

    baseline = {r["concurrency"]: r["img_s"] for r in rows if r["schedule"] == BASELINE and r["serving"] == "batch-1"}
    for row in rows:
        row["vs_unmerged_batch1"] = row["img_s"] / baseline[row["concurrency"]]
    header = ["clients", "model", "serving", "img/s", "p50 ms", "p99 ms", "mean batch", "vs unmerged batch-1"]
    ordered = sorted(rows, key=lambda r: (r["concurrency"], r["schedule"] != BASELINE, r["serving"]))
    print(
        markdown_table(
            header,
            [
                [
                    r["concurrency"],
                    r["schedule"],
                    "batch-1" if r["serving"] == "batch-1" else f"dynamic<={args.max_batch}",
                    f"{r['img_s']:.1f}",
                    f"{r['p50_ms']:.0f}",
                    f"{r['p99_ms']:.0f}",
                    f"{r['mean_batch']:.1f}",
                    f"{r['vs_unmerged_batch1']:.2f}x",
                ]
                for r in ordered
            ],
        )
    )
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
