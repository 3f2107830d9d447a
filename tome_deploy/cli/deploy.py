"""tome-deploy: packaging commands for deployment targets. `tome-deploy triton-repo ARTIFACT DIR`."""

from __future__ import annotations

import argparse
import sys

from tome_deploy.cli.common import add_debug_argument, exit_codes_help, run_command, say
from tome_deploy.cli.serve import default_model_name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tome-deploy", description="Package a ToMe artifact for a serving system.", epilog=exit_codes_help()
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    triton = commands.add_parser(
        "triton-repo",
        help="write a Triton Inference Server model repository for an artifact",
        description="Write DIR/<name>/config.pbtxt and DIR/<name>/1/model.onnx or model.plan (the artifact, copied unchanged) "
        "for NVIDIA Triton Inference Server, and print the tritonserver command.",
        epilog=exit_codes_help(),
    )
    triton.add_argument(
        "artifact",
        metavar="ARTIFACT",
        help="a .onnx file written by tome-export, or a .plan engine written by tome-build",
    )
    triton.add_argument(
        "repo", metavar="DIR", help="model repository folder (created if missing; other models in it are kept)"
    )
    triton.add_argument("--name", metavar="NAME", help="model name (default: the file name without suffix)")
    triton.add_argument(
        "--max-batch",
        type=int,
        metavar="N",
        help="max_batch_size for a dynamic batch (default 8; an engine: its profile maximum)",
    )
    triton.add_argument(
        "--max-delay-ms", type=float, default=5.0, metavar="MS", help="dynamic_batching max queue delay (default 5)"
    )
    triton.add_argument(
        "--instances", type=int, default=1, metavar="N", help="model instances (instance_group count, default 1)"
    )
    triton.add_argument(
        "--gpu", action="store_true", help="run ONNX models on the GPU (instance_group KIND_GPU; default KIND_CPU)"
    )
    triton.add_argument(
        "--backend",
        choices=["platform", "python"],
        default="platform",
        help="platform (default): Triton's onnxruntime_onnx / tensorrt_plan backends (GPU Triton images); "
        "python: runs the ONNX file through tome-deploy's ONNX Runtime runner in Triton's Python backend",
    )
    triton.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="--backend python: ONNX Runtime intra-op threads per instance (default: all cores)",
    )
    triton.add_argument(
        "--overwrite", action="store_true", help="replace DIR/<name> (every version in it) if it exists"
    )
    add_debug_argument(triton)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _triton_repo(args), args.debug)


def _triton_repo(args: argparse.Namespace) -> int:
    from tome_deploy.errors import InvalidInputError
    from tome_deploy.serving.served_model import read_served_model
    from tome_deploy.serving.triton_repo import TritonOptions, write_triton_repo

    if not 0 <= args.max_delay_ms <= 60_000:  # also refuses nan
        raise InvalidInputError(
            f"--max-delay-ms must be from 0 to 60000, got {args.max_delay_ms}; pass a delay in milliseconds"
        )
    options = TritonOptions(
        model_name=default_model_name(args.artifact) if args.name is None else args.name,
        max_batch=args.max_batch,
        max_queue_delay_us=round(args.max_delay_ms * 1000),
        instances=args.instances,
        kind="KIND_GPU" if args.gpu else "KIND_CPU",
        backend=args.backend,
        threads=args.threads,
    )
    served_model = read_served_model(args.artifact)
    repo = write_triton_repo(served_model, args.repo, options, overwrite=args.overwrite)
    weights = "".join(f" (weights in {data.name} beside it)" for data in served_model.data_files)
    say(f"wrote {repo.config_path} and {repo.model_path}{weights}")
    say(f"serve it with: {repo.command}")
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
