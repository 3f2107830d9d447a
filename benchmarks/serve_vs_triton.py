"""tome-serve vs a real Triton Inference Server (Python backend) on the same ONNX files, side by side.

Exports the unmerged ViT and its ToMe version (same random weights). For each, starts `tome-serve` and
`tritonserver` serving `tome-deploy triton-repo --backend python` of the same file, both with the same
ONNX Runtime intra-op threads (`--threads`), max batch and batching delay. Then, per concurrency level,
closed-loop `tritonclient.http` clients (binary tensors, one image per request) drive the four servers in
turn, interleaved over `--rounds` rounds so machine noise hits all alike. img/s is the median over rounds;
p50/p99 are client latencies pooled over rounds. Needs tritonserver: .ci/tritonserver.sh provides it.

    python benchmarks/serve_vs_triton.py                      # ViT-S/16 r=16 vs unmerged, 1/4/16 clients
    python benchmarks/serve_vs_triton.py --model test_vit --requests 32 --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import SCHEDULES, export_variants
from serve_throughput import MODEL_NAME, ServerProcess, drive

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from triton_server import start_tritonserver, stop_tritonserver

from tome_deploy.serving.artifact import read_artifact
from tome_deploy.serving.triton_repo import TritonOptions, write_triton_repo


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--schedule", default="r=16", choices=("r=8", "r=16", "r=(16,-1)"))
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=0, help="requests per measurement (default: 8 x concurrency, 16 to 64)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, the same for both servers")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    return parser.parse_args()


class TritonProcess:
    def __init__(self, path: Path, folder: Path, args: argparse.Namespace):
        options = TritonOptions(MODEL_NAME, max_batch=args.max_batch, max_queue_delay_us=round(args.max_delay_ms * 1000),
                                backend="python", threads=args.threads)
        write_triton_repo(read_artifact(path), folder / "models", options)
        self.server = start_tritonserver(folder / "models", folder / "tritonserver.log", timeout_s=300)
        self.url = self.server.http_url

    def stop(self) -> None:
        stop_tritonserver(self.server)


def main() -> None:
    args = parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = export_variants(args.model, {args.schedule: SCHEDULES[args.schedule]},
                                   Path(tmp), plain=True, merge="scatter")
        paths = {label: outcome.export.path for label, outcome in outcomes.items()}
        images = np.random.default_rng(0).standard_normal((64, *outcomes["unmerged"].export.metadata.input_size)).astype(np.float32)
        servers = {}
        try:
            for label, path in paths.items():
                servers[label, "tome-serve"] = ServerProcess(path, args.max_batch, args.max_delay_ms, ("--threads", str(args.threads)))
                folder = Path(tmp) / f"triton_{label.replace('=', '')}"
                folder.mkdir()
                servers[label, "triton"] = TritonProcess(path, folder, args)
            for server in servers.values():  # warm-up: ONNX Runtime allocates on the first calls of each batch size
                drive(server.url, images, args.max_batch, 2 * args.max_batch)
            for concurrency in levels:
                requests = args.requests or min(64, max(16, 8 * concurrency))
                seconds = {key: [] for key in servers}
                latencies = {key: [] for key in servers}
                for _ in range(args.rounds):
                    for key, server in servers.items():
                        took, lat = drive(server.url, images, concurrency, requests)
                        seconds[key].append(took)
                        latencies[key] += lat
                for (label, which) in servers:
                    rows.append({"clients": concurrency, "model": label, "server": which,
                                 "img_s": requests / statistics.median(seconds[label, which]),
                                 "p50_ms": 1000 * float(np.percentile(latencies[label, which], 50)),
                                 "p99_ms": 1000 * float(np.percentile(latencies[label, which], 99))})
                    print(f"  clients {concurrency:>2} {label:<9} {which:<10} {rows[-1]['img_s']:6.1f} img/s", file=sys.stderr, flush=True)
        finally:
            for server in servers.values():
                server.stop()
    triton = {(r["clients"], r["model"]): r["img_s"] for r in rows if r["server"] == "triton"}
    print(f"{'clients':>7} {'model':<9} {'server':<10} {'img/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'vs Triton':>9}")
    for row in sorted(rows, key=lambda r: (r["clients"], r["model"] != "unmerged", r["server"])):
        print(f"{row['clients']:>7} {row['model']:<9} {row['server']:<10} {row['img_s']:7.1f} {row['p50_ms']:7.0f} {row['p99_ms']:7.0f} "
              f"{row['img_s'] / triton[row['clients'], row['model']]:8.2f}x")


if __name__ == "__main__":
    main()
