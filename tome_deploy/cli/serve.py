"""tome-serve: serve a tome-deploy artifact over HTTP (KServe v2 protocol) with dynamic batching."""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from tome_deploy.cli.common import add_debug_argument, exit_codes_help, run_command, say
from tome_deploy.runtime.factory import CPU_RUNTIMES

MAX_COUNT = 2**31 - 1  # --max-batch and --max-queue: int32, as Triton's max_batch_size
MAX_BODY_MB = 4096  # a request body is held in memory whole: 4 GiB is past any real batch of images
MAX_SECONDS = 86400.0  # timeouts and delays: a day is past any real deadline (and within every timer's range)
DEVICE_PROVIDERS = {"cpu": ("CPUExecutionProvider",), "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tome-serve",
        description="Serve a ToMe ONNX export (ONNX Runtime) or engine over HTTP: KServe v2 inference protocol, "
        "an image endpoint, dynamic batching and Prometheus metrics.",
        epilog=exit_codes_help(4) + ". Needs the serve extra: pip install 'tome-deploy[serve]'",
    )
    parser.add_argument(
        "artifact", metavar="ARTIFACT", help="a .onnx file written by tome-export (or a TensorRT engine .plan)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    parser.add_argument("--name", metavar="NAME", help="model name in the URLs (default: the file name without suffix)")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=8,
        metavar="N",
        help="rows per model call (default 8; a fixed-batch export caps it at its batch)",
    )
    parser.add_argument(
        "--max-delay-ms",
        type=float,
        default=5.0,
        metavar="MS",
        help="how long a request may wait for others to batch with (default 5)",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests allowed to wait; more get HTTP 503 (default 64)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=30.0,
        metavar="S",
        help="per-request limit, queue + compute; later gets HTTP 504 (default 30)",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=64.0,
        metavar="MB",
        help="largest request body; larger gets HTTP 413 (default 64)",
    )
    device = parser.add_mutually_exclusive_group()
    device.add_argument(
        "--device",
        choices=sorted(DEVICE_PROVIDERS),
        default="cpu",
        help="ONNX Runtime device (default cpu); cuda fails unless the CUDA provider is active",
    )
    device.add_argument("--providers", metavar="P1,P2", help="explicit ONNX Runtime providers; each must be active")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="ONNX Runtime / OpenVINO intra-op threads (default: all cores)"
    )
    parser.add_argument(
        "--runtime",
        choices=CPU_RUNTIMES,
        default="onnxruntime",
        help="what runs an ONNX file: onnxruntime (default) or openvino on CPU (pip install 'tome-deploy[openvino]'); "
        "an OpenVINO IR (NAME.xml, e.g. a --precision bf16 export) needs openvino",
    )
    parser.add_argument("--labels", metavar="FILE", help="class names, one per line, for the image endpoint")
    parser.add_argument(
        "--top-k", type=int, default=5, metavar="K", help="classes the image endpoint returns by default (default 5)"
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=16_000_000,
        metavar="N",
        help="image endpoint: largest width x height, read from the image header before decoding; larger gets HTTP 400 (default 16000000)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=256,
        metavar="N",
        help="connections and requests at once; more get HTTP 503 (default 256)",
    )
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=10.0,
        metavar="S",
        help="request headers must arrive within this, or the connection closes (default 10)",
    )
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        default=30.0,
        metavar="S",
        help="a request body must arrive within this; later gets HTTP 408 (default 30)",
    )
    parser.add_argument(
        "--graceful-timeout-s",
        type=float,
        default=30.0,
        metavar="S",
        help="at shutdown, how long in-flight requests may take to finish (default 30)",
    )
    parser.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level (default warning)",
    )
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _serve(args), args.debug)


def default_model_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem) or "model"


def check_limits(args: argparse.Namespace) -> None:
    """Refuse every flag that no server could honour (NaN, inf and values past any sane bound included) and a
    model name that is not one URL part, before anything starts."""
    from tome_deploy.errors import InvalidInputError
    from tome_deploy.serving.triton_repo import check_model_name

    if args.name is not None:
        check_model_name(args.name)  # the URL's model part: the same rule as a Triton model name
    positive_counts = {
        "--top-k": args.top_k,
        "--max-image-pixels": args.max_image_pixels,
        "--max-connections": args.max_connections,
        "--threads": 1 if args.threads is None else args.threads,
    }
    for flag, value in positive_counts.items():
        if value < 1:
            raise InvalidInputError(f"{flag} is {value}; pass an integer >= 1")
    for flag, value in {"--max-batch": args.max_batch, "--max-queue": args.max_queue}.items():
        if not 1 <= value <= MAX_COUNT:
            raise InvalidInputError(
                f"{flag} must be >= 1 and at most {MAX_COUNT}, got {value}; pass a value in that range"
            )
    positive_numbers = {  # flag -> (value, the largest accepted)
        "--max-body-mb": (args.max_body_mb, MAX_BODY_MB),
        "--timeout-s": (args.timeout_s, MAX_SECONDS),
        "--header-timeout-s": (args.header_timeout_s, MAX_SECONDS),
        "--body-timeout-s": (args.body_timeout_s, MAX_SECONDS),
        "--graceful-timeout-s": (args.graceful_timeout_s, MAX_SECONDS),
    }
    for flag, (value, largest) in positive_numbers.items():
        if not math.isfinite(value) or not 0 < value <= largest:
            raise InvalidInputError(f"{flag} is {value}; pass a finite number > 0 and at most {largest:g}")
    if not math.isfinite(args.max_delay_ms) or not 0 <= args.max_delay_ms <= MAX_SECONDS * 1000:
        raise InvalidInputError(
            f"--max-delay-ms is {args.max_delay_ms}; pass a finite number >= 0 and at most {MAX_SECONDS * 1000:g}"
        )


def _serve(args: argparse.Namespace) -> int:
    from tome_deploy.runtime.factory import open_runner
    from tome_deploy.serving.app import ServeSettings, build_app, require_serving_stack
    from tome_deploy.serving.batcher import BatchPolicy
    from tome_deploy.serving.images import read_labels
    from tome_deploy.serving.served_model import read_served_model
    from tome_deploy.serving.server import ConnectionLimits, bind_socket, run_server

    require_serving_stack()
    check_limits(args)
    policy = BatchPolicy(args.max_batch, args.max_delay_ms / 1000, args.max_queue, args.timeout_s)
    sock = bind_socket(args.host, args.port)  # fail on a taken port before loading anything
    served_model = read_served_model(args.artifact)
    providers = (
        tuple(p.strip() for p in args.providers.split(",") if p.strip())
        if args.providers
        else DEVICE_PROVIDERS[args.device]
    )
    runner = open_runner(served_model.path, args.runtime, providers=providers, threads=args.threads)
    settings = ServeSettings(
        model_name=default_model_name(args.artifact) if args.name is None else args.name,
        policy=policy,
        max_body_bytes=int(args.max_body_mb * (1 << 20)),
        labels=read_labels(args.labels, served_model.num_classes) if args.labels else None,
        default_top_k=args.top_k,
        body_timeout_s=args.body_timeout_s,
        max_image_pixels=args.max_image_pixels,
    )
    with runner:
        app = build_app(served_model, runner, settings)
        host, port = sock.getsockname()[:2]
        meta = served_model.metadata
        say(
            f"serving {settings.model_name} ({meta.model}, r per layer {meta.r_effective}, tokens {meta.tokens_per_layer[0]}->{meta.tokens_per_layer[-1]}) "
            f"with {'OpenVINO (CPU)' if args.runtime == 'openvino' else ', '.join(providers)} on http://{host}:{port}"
        )
        say(
            f"  infer: POST /v2/models/{settings.model_name}/infer   images: POST /v2/models/{settings.model_name}/classify   metrics: GET /metrics"
        )
        limits = ConnectionLimits(max_connections=args.max_connections, header_timeout_s=args.header_timeout_s)
        run_server(app, sock, graceful_timeout_s=args.graceful_timeout_s, log_level=args.log_level, limits=limits)
    say("tome-serve stopped: all in-flight requests answered")
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
