"""tome-serve vs a real Triton Inference Server (Python backend) on the same ONNX files, side by side.

Exports the unmerged ViT (the r=0 tome-export, which tome-serve needs for its metadata) and its ToMe
version (same random weights). For each, starts `tome-serve` and `tritonserver` serving
`tome-deploy triton-repo --backend python` of the same file, both with the same ONNX Runtime intra-op
threads (`--threads`), max batch and batching delay (checked on both servers' model configs before
timing). Then, per concurrency level, closed-loop `tritonclient.http` clients (binary tensors, one image
per request) drive the four servers in turn, interleaved over `--rounds` rounds, every other round in
reverse order, so machine noise and drift hit all alike.

Per row: img/s (median over rounds), p50/p99 client latency (pooled over rounds), the batches each server
formed (mean rows per model call; the size histogram is printed under the table), "model busy" (the
server's own compute time over wall time: below 100% the model waited for requests), "cores used" (the
server's CPU seconds over wall time: how much of the machine it got) and its CPU milliseconds per image
from /proc, and of those the front end's. The front end is, for tome-serve, the event-loop thread (HTTP,
routing, batch queue, responses) and its "tome-decode" threads (request parsing); for Triton, the
tritonserver process (HTTP, dynamic batcher, shared memory to the stub). The rest is the model:
tome-serve's "tome-infer" thread and ONNX Runtime's threads, Triton's Python backend stub (both stack the
batch and split its output there). img/s = cores used / CPU per image: with the model busy ~100%, a gap
in img/s at equal CPU per image is a gap in the share of a shared machine the server got during its
runs, not more work. Needs tritonserver (.ci/tritonserver.sh provides it) and Linux (/proc). The table
is markdown, as in docs/benchmarks.md; the command line and the load average are printed with it.

    python benchmarks/serve_vs_triton.py                      # ViT-S/16 r=16 vs unmerged, 1/4/16 clients
    python benchmarks/serve_vs_triton.py --model test_vit --requests 32 --rounds 1
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import statistics
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import (
    BASELINE,
    SCHEDULES,
    export_variants,
    whole_numbers,
    write_json,
)
from serve_throughput import MODEL_NAME, ServerProcess, drive

from tome_deploy.serving.served_model import read_served_model
from tome_deploy.serving.triton_repo import TritonOptions, write_triton_repo
from tome_deploy.serving.tritonserver import start_tritonserver, stop_tritonserver, tritonserver_binary

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SERVER_LABELS = {"tome-serve": "tome-serve", "triton": "Triton"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--schedule", default="r=16", choices=("r=8", "r=16", "r=(16,-1)"))
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument(
        "--requests", type=int, default=0, help="requests per measurement (default: 8 x concurrency, 16 to 64)"
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=2, help="ONNX Runtime intra-op threads, the same for both servers"
    )
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    return parser.parse_args()


def get_json(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=30).read())


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants (Triton's Python backend stubs are children of tritonserver)."""
    found, stack = [], [pid]
    while stack:
        current = stack.pop()
        found.append(current)
        for task in os.listdir(f"/proc/{current}/task"):
            try:
                with open(f"/proc/{current}/task/{task}/children") as stream:
                    stack += [int(child) for child in stream.read().split()]
            except OSError:  # the thread ended meanwhile
                pass
    return found


def thread_cpu(pid: int) -> dict[tuple[int, int, str], float]:
    """(process id, thread id, OS thread name) -> CPU seconds (user + system) of every thread in the tree."""
    seconds = {}
    for process in process_tree(pid):
        for task in os.listdir(f"/proc/{process}/task"):
            try:
                with open(f"/proc/{process}/task/{task}/stat") as stream:
                    stat = stream.read()
            except OSError:  # the thread ended meanwhile
                continue
            name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            seconds[process, int(task), name] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return seconds


@dataclass
class Sample:
    """A server's cumulative counters at one moment."""

    front_end_s: float
    model_s: float
    compute_s: float  # the server's own model time (its metrics)
    batches: collections.Counter  # batch size -> batches run

    def __add__(self, other: Sample) -> Sample:
        return Sample(
            self.front_end_s + other.front_end_s,
            self.model_s + other.model_s,
            self.compute_s + other.compute_s,
            self.batches + other.batches,
        )

    def __sub__(self, other: Sample) -> Sample:
        return Sample(
            self.front_end_s - other.front_end_s,
            self.model_s - other.model_s,
            self.compute_s - other.compute_s,
            self.batches - other.batches,
        )


class TomeServe:
    def __init__(self, path: Path, args: argparse.Namespace):
        self.process = ServerProcess(path, args.max_batch, args.max_delay_ms, ("--threads", str(args.threads)))
        self.url = self.process.url

    def settings(self) -> dict:
        """What the running server reports of its batching (its delay and threads are the flags it was started with)."""
        return {"max batch": get_json(f"http://{self.url}/v2/models/{MODEL_NAME}")["max_batch_size"]}

    def is_front_end(self, pid: int, tid: int, name: str) -> bool:
        return tid == self.process.process.pid or name.startswith("tome-decode")

    def sample(self) -> Sample:
        text = urllib.request.urlopen(f"http://{self.url}/metrics", timeout=30).read().decode()
        values = dict(
            line.rsplit(" ", 1)
            for line in text.splitlines()
            if line.startswith(("tome_batch_size_bucket", "tome_compute_seconds_sum"))
        )
        cumulative = sorted(
            (float(key.split('le="')[1].split('"')[0]), float(value)) for key, value in values.items() if "le=" in key
        )
        batches, below = collections.Counter(), 0.0
        for size, count in cumulative:
            if size != float("inf") and count > below:
                batches[int(size)] = round(count - below)
            below = count
        return Sample(*split_cpu(self, self.process.process.pid), float(values["tome_compute_seconds_sum"]), batches)

    def stop(self) -> None:
        self.process.stop()


class Triton:
    def __init__(self, path: Path, folder: Path, args: argparse.Namespace):
        options = TritonOptions(
            MODEL_NAME,
            max_batch=args.max_batch,
            max_queue_delay_us=round(args.max_delay_ms * 1000),
            backend="python",
            threads=args.threads,
        )
        write_triton_repo(read_served_model(path), folder / "models", options)
        binary = tritonserver_binary(os.environ.get("TOME_TRITONSERVER"))
        self.server = start_tritonserver(binary, folder / "models", folder / "tritonserver.log", timeout_s=300)
        self.url = self.server.http_url

    def settings(self) -> dict:
        config = get_json(f"http://{self.url}/v2/models/{MODEL_NAME}/config")
        return {
            "max batch": config["max_batch_size"],
            "delay us": int(config["dynamic_batching"].get("max_queue_delay_microseconds", 0)),
            "threads": int(config["parameters"]["tome.threads"]["string_value"]),
        }

    def is_front_end(self, pid: int, tid: int, name: str) -> bool:
        return pid == self.server.process.pid

    def sample(self) -> Sample:
        stats = get_json(f"http://{self.url}/v2/models/{MODEL_NAME}/stats")["model_stats"][0].get("batch_stats", [])
        batches = collections.Counter(
            {int(entry["batch_size"]): int(entry["compute_infer"]["count"]) for entry in stats}
        )
        compute_ns = sum(
            int(entry[part].get("ns", 0))
            for entry in stats
            for part in ("compute_input", "compute_infer", "compute_output")
        )
        return Sample(*split_cpu(self, self.server.process.pid), compute_ns / 1e9, batches)

    def stop(self) -> None:
        stop_tritonserver(self.server)


def split_cpu(server, pid: int) -> tuple[float, float]:
    """(front end, model) CPU seconds of the server's threads so far."""
    front, model = 0.0, 0.0
    for (process, tid, name), seconds in thread_cpu(pid).items():
        if server.is_front_end(process, tid, name):
            front += seconds
        else:
            model += seconds
    return front, model


def check_same_settings(servers: dict, args: argparse.Namespace) -> None:
    """Both servers batch alike and run ONNX Runtime alike, or nothing is timed."""
    wanted = {"max batch": args.max_batch, "delay us": round(args.max_delay_ms * 1000), "threads": args.threads}
    for key, server in servers.items():
        got = server.settings()
        if any(wanted[name] != value for name, value in got.items()):
            raise SystemExit(f"{' '.join(key)} runs with {got}, not {wanted}: the comparison would not be fair")


def measure(servers: dict, images: np.ndarray, concurrency: int, requests: int, rounds: int) -> dict:
    """Interleaved rounds (every other one reversed): seconds and latencies per round, counter deltas summed."""
    seconds = {key: [] for key in servers}
    latencies = {key: [] for key in servers}
    used = {key: Sample(0.0, 0.0, 0.0, collections.Counter()) for key in servers}  # summed over rounds
    for round_index in range(rounds):
        order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
        for key in order:
            before = servers[key].sample()
            took, lat = drive(servers[key].url, images, concurrency, requests)
            used[key] += servers[key].sample() - before
            seconds[key].append(took)
            latencies[key] += lat
    return {key: row(key, concurrency, requests, seconds[key], latencies[key], used[key]) for key in servers}


def row(
    key: tuple[str, str], concurrency: int, requests: int, seconds: list[float], latencies: list[float], used: Sample
) -> dict:
    label, kind = key
    images = requests * len(seconds)
    return {
        "clients": concurrency,
        "model": label,
        "server": kind,
        "requests": requests,
        "rounds": len(seconds),
        "img_s": requests / statistics.median(seconds),
        "img_s_per_round": [requests / took for took in seconds],
        "p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "p99_ms": 1000 * float(np.percentile(latencies, 99)),
        "mean_batch": sum(size * count for size, count in used.batches.items()) / max(1, sum(used.batches.values())),
        "batches": dict(sorted(used.batches.items())),
        "model_busy": used.compute_s / sum(seconds),
        "cores_used": (used.front_end_s + used.model_s) / sum(seconds),
        "cpu_ms_per_img": 1000 * (used.front_end_s + used.model_s) / images,
        "front_end_ms_per_img": 1000 * used.front_end_s / images,
    }


def model_label(label: str) -> str:
    return label if label == BASELINE else f"ToMe {label}"


def table(header: list[str], rows: list[list]) -> str:
    """Markdown, as docs/benchmarks.md has it: model and server columns left-aligned, numbers right-aligned."""
    align = ["---" if name in ("model", "server") else "---:" for name in header]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in [header, *rows]).replace(
        "\n", "\n|" + "|".join(align) + "|\n", 1
    )


def print_report(rows: list[dict], args: argparse.Namespace, load_before: tuple, load_after: tuple) -> None:
    triton = {(r["clients"], r["model"]): r["img_s"] for r in rows if r["server"] == "triton"}
    ordered = sorted(rows, key=lambda r: (r["clients"], r["model"] != BASELINE, r["server"] != "tome-serve"))
    header = [
        "clients",
        "model",
        "server",
        "img/s",
        "p50 ms",
        "p99 ms",
        "vs Triton",
        "mean batch",
        "model busy",
        "cores used",
        "CPU ms/img",
        "front end ms/img",
    ]
    print(f"command: python benchmarks/serve_vs_triton.py {shlex.join(sys.argv[1:])}".rstrip())
    print(
        f"load average (1/5/15 min): {' '.join(f'{x:.1f}' for x in load_before)} before, {' '.join(f'{x:.1f}' for x in load_after)} after; "
        f"{os.cpu_count()} CPUs"
    )
    print()
    print(
        table(
            header,
            [
                [
                    r["clients"],
                    model_label(r["model"]),
                    SERVER_LABELS[r["server"]],
                    f"{r['img_s']:.1f}",
                    f"{r['p50_ms']:.0f}",
                    f"{r['p99_ms']:.0f}",
                    f"{r['img_s'] / triton[r['clients'], r['model']]:.2f}x",
                    f"{r['mean_batch']:.1f}",
                    f"{100 * r['model_busy']:.0f}%",
                    f"{r['cores_used']:.2f}",
                    f"{r['cpu_ms_per_img']:.0f}",
                    f"{r['front_end_ms_per_img']:.1f}",
                ]
                for r in ordered
            ],
        )
    )
    print()
    print("batch sizes formed (size x batches):")
    for r in ordered:
        sizes = " ".join(f"{size}x{count}" for size, count in r["batches"].items())
        print(f"  {r['clients']:>2} clients, {model_label(r['model'])}, {SERVER_LABELS[r['server']]}: {sizes}")


def main() -> None:
    args = parse_args()
    levels = whole_numbers(args.concurrency)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = export_variants(args.model, {args.schedule: SCHEDULES[args.schedule]}, Path(tmp), merge="scatter")
        paths = {label: outcome.export.path for label, outcome in outcomes.items()}
        images = (
            np.random.default_rng(0)
            .standard_normal((64, *outcomes[BASELINE].export.metadata.input.shape))
            .astype(np.float32)
        )
        servers = {}
        try:
            for label, path in paths.items():
                servers[label, "tome-serve"] = TomeServe(path, args)
                folder = Path(tmp) / f"triton_{label.replace('=', '')}"
                folder.mkdir()
                servers[label, "triton"] = Triton(path, folder, args)
            check_same_settings(servers, args)
            for server in servers.values():  # warm-up: ONNX Runtime allocates on the first calls of each batch size
                drive(server.url, images, args.max_batch, 2 * args.max_batch)
            for concurrency in levels:
                requests = args.requests or min(64, max(16, 8 * concurrency))
                for key, result in measure(servers, images, concurrency, requests, args.rounds).items():
                    rows.append(result)
                    print(
                        f"  clients {concurrency:>2} {key[0]:<9} {key[1]:<10} {result['img_s']:6.1f} img/s  "
                        f"{result['cpu_ms_per_img']:5.0f} CPU ms/img",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()
    print_report(rows, args, load_before, os.getloadavg())
    write_json(rows, args.json)


if __name__ == "__main__":
    main()
