"""What every tome-* command shares: model-loading flags, streams, one-line errors and exit codes.

Exit codes: 0 success; 1 parity validation failed; 2 bad input (arguments, model, checkpoint, schedule,
paths); 3 export failed; 4 an optional dependency is missing; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from tome_deploy.errors import InvalidInputError, ToMeError

EXIT_CODES_HELP = (
    "exit codes: 0 success, 1 parity validation failed, 2 bad input (arguments, model, checkpoint, "
    "schedule, paths), 3 export failed, 4 missing optional dependency, 130 interrupted"
)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="MODEL", help="timm model name, a .pt/.pth/.safetensors state dict, or a torch.save()d module")
    parser.add_argument("--model", dest="arch", metavar="ARCH", help="timm architecture for a state-dict file without an 'arch' key")
    parser.add_argument("--checkpoint", metavar="PATH", help="weights for a timm model name (.pt/.pth/.safetensors)")
    parser.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights (needs a reachable hub or cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init when no weights are given (default 0)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow pickled modules that need globals outside torch/timm (runs their code: only for files you trust)")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=float, default=None, help="absolute tolerance of the parity check (default 1e-4)")
    parser.add_argument("--rtol", type=float, default=None, help="relative tolerance of the parity check (default 1e-3)")
    parser.add_argument("--report", metavar="PATH", help="write the JSON report to PATH")
    parser.add_argument("--json", action="store_true", help="print the JSON report on stdout (human output stays on stderr)")
    parser.add_argument("--quiet", action="store_true", help="print only errors and the verdict on stderr")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def emit_report(report: dict, args: argparse.Namespace) -> None:
    text = json.dumps(report, indent=2, default=str)
    if args.report:
        Path(args.report).write_text(text + "\n")
    if args.json:
        print(text, flush=True)


def check_report_path(args: argparse.Namespace) -> None:
    """Fail before the long work starts, not after it."""
    if args.report:
        folder = Path(args.report).expanduser().parent
        if not folder.is_dir():
            raise InvalidInputError(f"--report directory {folder} does not exist; create it first")


def run_command(main: Callable[[], int]) -> int:
    """Turn typed errors into one line on stderr and their exit code."""
    try:
        return main()
    except ToMeError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
