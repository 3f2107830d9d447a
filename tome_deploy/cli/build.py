"""tome-build: ToMe ONNX file -> TensorRT engine (+ sidecar JSON); --inspect prints an engine's sidecar."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tome_deploy.cli.common import add_debug_argument, exit_codes_help, run_command, say
from tome_deploy.errors import InvalidInputError

BACKEND_CHOICES = ("auto", "tensorrt", "tensorrt-rtx")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tome-build",
        description="Build a TensorRT (or TensorRT-RTX) engine from an ONNX file written by tome-export; "
        "writes MODEL.plan and MODEL.plan.json (backend, GPU, profile, precision, ToMe schedule).",
        epilog=exit_codes_help(4, c3="parse/build failed or unexpected error (please report it)"),
    )
    parser.add_argument("onnx", nargs="?", metavar="MODEL.onnx", help="ONNX file to build")
    parser.add_argument("-o", "--output", metavar="PATH", help="engine file to write (e.g. model.plan)")
    parser.add_argument(
        "--inspect", metavar="PLAN", help="print the sidecar of an engine and check the file against it"
    )
    parser.add_argument(
        "--backend",
        choices=BACKEND_CHOICES,
        default="auto",
        help="auto (default): full TensorRT if installed, else TensorRT-RTX",
    )
    parser.add_argument(
        "--min-batch", type=int, metavar="N", help="smallest batch of the optimization profile (default 1)"
    )
    parser.add_argument("--opt-batch", type=int, metavar="N", help="batch the kernels are tuned for (default 8)")
    parser.add_argument("--max-batch", type=int, metavar="N", help="largest batch of the profile (default 32)")
    parser.add_argument(
        "--workspace", type=int, metavar="MiB", help="builder workspace limit in MiB (default: TensorRT's)"
    )
    parser.add_argument(
        "--timing-cache", metavar="PATH", help="persistent timing cache, read and updated (full TensorRT)"
    )
    parser.add_argument(
        "--compute-capability",
        metavar="CC",
        help="build ahead of time for this GPU (e.g. 89; TensorRT-RTX, no GPU needed)",
    )
    parser.add_argument("--json", action="store_true", help="print the sidecar JSON on stdout")
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _inspect(args) if args.inspect else _build(args), args.debug)


def _inspect(args: argparse.Namespace) -> int:
    from tome_deploy.artifact.sidecar import (
        EngineMismatchError,
        check_runs_here,
        read_sidecar,
    )
    from tome_deploy.errors import MissingDependencyError
    from tome_deploy.runtime.tensorrt_backend import (
        load_backend,
        local_compute_capability,
    )

    if args.onnx or args.output:
        raise InvalidInputError("--inspect takes only the engine: tome-build --inspect model.plan")
    sidecar = read_sidecar(args.inspect)
    say(sidecar.summary())
    try:
        backend = load_backend(sidecar.backend)
        check_runs_here(sidecar, backend.name, backend.version, local_compute_capability())
        say("runs here    yes")
    except (EngineMismatchError, MissingDependencyError) as err:
        say(f"runs here    no: {err}")
    if args.json:
        print(sidecar.to_json(), end="")
    return 0


def _build(args: argparse.Namespace) -> int:
    if not args.onnx or not args.output:
        raise InvalidInputError("usage: tome-build MODEL.onnx -o MODEL.plan (or tome-build --inspect MODEL.plan)")
    from tome_deploy.tensorrt.build import BuildOptions, build_engine

    options = BuildOptions(
        backend=args.backend,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        workspace_mib=args.workspace,
        compute_capability=args.compute_capability,
        timing_cache=Path(args.timing_cache) if args.timing_cache else None,
    )
    result = build_engine(args.onnx, args.output, options, say=say)
    say(
        f"wrote {result.plan} ({result.sidecar.plan_bytes / 1e6:.1f} MB) and {result.plan.name}.json in {result.seconds:.1f} s"
    )
    if args.json:
        print(json.dumps(json.loads(result.sidecar.to_json())), flush=True)
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
