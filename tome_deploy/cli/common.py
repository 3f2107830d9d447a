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
    parser.add_argument("source", metavar="MODEL", help="timm model name (ViT, Eva), a .pt/.pth/.safetensors state dict, a torch.save()d module, a Hugging Face save_pretrained folder, hf:<id> (with --pretrained), or open_clip:<arch> (e.g. open_clip:ViT-B-32)")
    parser.add_argument("--model", dest="arch", metavar="ARCH", help="timm architecture for a state-dict file without an 'arch' key")
    parser.add_argument("--checkpoint", metavar="PATH", help="weights for a timm model name or open_clip:<arch> (.pt/.pth/.safetensors)")
    parser.add_argument("--pretrained", action="store_true", help="download timm's pretrained weights (needs a reachable hub or cache)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random init when no weights are given (default 0)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow pickled modules that need globals outside torch/timm (runs their code: only for files you trust)")


def model_source(args: argparse.Namespace):
    """The flags of add_model_arguments (and --img-size where the command has it) as one ModelSource."""
    from tome_deploy.models.loading.source import ModelSource

    return ModelSource(args.source, arch=args.arch, checkpoint=args.checkpoint, pretrained=args.pretrained,
                       img_size=getattr(args, "img_size", None), trust_pickle=args.trust_pickle, seed=args.seed)


def add_schedule_arguments(parser: argparse.ArgumentParser, default_r: str) -> argparse._MutuallyExclusiveGroup:
    """--r, --r-inflect / --schedule and --strict; returns the exclusive group for a command's own alternatives."""
    parser.add_argument("--r", default=None, help=f"tokens merged per layer (default {default_r})")
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument("--r-inflect", type=float, metavar="F", help="linear ramp (r, F), F in [-1, 1]; -1 is the paper's decreasing schedule")
    schedule.add_argument("--schedule", metavar="R0,R1,...", help="explicit r per layer (missing layers get 0)")
    parser.add_argument("--strict", action="store_true", help="fail instead of clamping when r is too large for a layer")
    return schedule


def schedule_spec(args: argparse.Namespace, default_r: str):
    """--r / --r-inflect / --schedule -> one RSpec (core.schedule.parse_r_arguments)."""
    from tome_deploy.core.schedule import parse_r_arguments

    return parse_r_arguments(args.r if args.r is not None else default_r, args.r_inflect, args.schedule)


def say_clamp_note(schedule, report: Callable[[str], None]) -> None:
    """One explained line when the schedule had to clamp r (README: "When r is clamped")."""
    if schedule.clamped_layers:
        report(f"note: {schedule.clamp_note()}")


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
