"""What every tome-* command shares: model-loading flags, streams, one-line errors and exit codes.

Exit codes (each command's --help lists the ones it can return): 0 success; 1 parity validation failed;
2 bad input (arguments, model, checkpoint, schedule, paths, damaged artifacts); 3 export/build failed, or an
unexpected error (a bug: one line asking for a report; the traceback with --debug or TOME_DEBUG=1);
4 an optional dependency is missing; 5 a quality budget is not met (tome-validate --data); 130 interrupted
(Ctrl-C), 129 hung up (SIGHUP), 143 terminated (SIGTERM): all three remove every staged and temporary file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from tome_deploy.errors import ToMeError, error_reason
from tome_deploy.output_files import discard_temporaries, write_atomically

EXIT_CODES = {
    0: "success",
    1: "parity validation failed",
    2: "bad input (arguments, model, checkpoint, schedule, paths, damaged artifacts)",
    3: "unexpected error (please report it)",
    4: "missing optional dependency",
    5: "quality budget not met",
    129: "hung up (SIGHUP)",
    130: "interrupted (Ctrl-C)",
    143: "terminated (SIGTERM)",
}
# Signals that stop a command the way Ctrl-C does (exit code 128 + the signal number).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
DEBUG_VARIABLE = "TOME_DEBUG"  # TOME_DEBUG=1: print the traceback of any error, as --debug does
UNEXPECTED = "unexpected; please report it, with the output of --debug, to the tome-deploy issue tracker"


def exit_codes_help(*codes: int, **meanings: str) -> str:
    """The epilog line of the codes one command can return; `meanings` (e.g. c3=...) reword a code for it."""
    parts = [
        f"{code} {meanings.get(f'c{code}', EXIT_CODES[code])}" for code in sorted({0, 2, 3, 129, 130, 143, *codes})
    ]
    return "exit codes: " + ", ".join(parts) + f"; {DEBUG_VARIABLE}=1 or --debug prints tracebacks"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        metavar="MODEL",
        help="timm model name (ViT, Eva), a .pt/.pth/.safetensors state dict, a torch.save()d module, a Hugging Face save_pretrained folder, hf:<id> (with --pretrained), open_clip:<arch> (e.g. open_clip:ViT-B-32) or torchvision:<builder> (e.g. torchvision:vit_b_16)",
    )
    parser.add_argument(
        "--model", dest="arch", metavar="ARCH", help="timm architecture for a state-dict file without an 'arch' key"
    )
    parser.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="weights for a timm model name, open_clip:<arch> or torchvision:<builder> (.pt/.pth/.safetensors)",
    )
    parser.add_argument(
        "--pretrained", action="store_true", help="download timm's pretrained weights (needs a reachable hub or cache)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random init when no weights are given (default 0)"
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickled modules that need globals outside torch/timm (runs their code: only for files you trust)",
    )


def model_source(args: argparse.Namespace):
    """The flags of add_model_arguments (and --img-size where the command has it) as one ModelSource."""
    from tome_deploy.models.loading.source import ModelSource

    return ModelSource(
        args.source,
        arch=args.arch,
        checkpoint=args.checkpoint,
        pretrained=args.pretrained,
        img_size=getattr(args, "img_size", None),
        trust_pickle=args.trust_pickle,
        seed=args.seed,
    )


def add_schedule_arguments(parser: argparse.ArgumentParser, default_r: str) -> argparse._MutuallyExclusiveGroup:
    """--r, --r-inflect / --schedule and --strict; returns the exclusive group for a command's own alternatives."""
    parser.add_argument("--r", default=None, help=f"tokens merged per layer (default {default_r})")
    schedule = parser.add_mutually_exclusive_group()
    schedule.add_argument(
        "--r-inflect",
        type=float,
        metavar="F",
        help="linear ramp (r, F), F in [-1, 1]; -1 is the paper's decreasing schedule",
    )
    schedule.add_argument("--schedule", metavar="R0,R1,...", help="explicit r per layer (missing layers get 0)")
    parser.add_argument(
        "--strict", action="store_true", help="fail instead of clamping when r is too large for a layer"
    )
    return schedule


def schedule_spec(args: argparse.Namespace, default_r: str):
    """--r / --r-inflect / --schedule -> one RSpec (core.schedule.parse_r_arguments)."""
    from tome_deploy.core.schedule import parse_r_arguments

    return parse_r_arguments(args.r if args.r is not None else default_r, args.r_inflect, args.schedule)


def say_clamp_note(schedule, report: Callable[[str], None]) -> None:
    """One explained line when the schedule had to clamp r (docs/cli.md: "When r is clamped")."""
    if schedule.clamped_layers:
        report(f"note: {schedule.clamp_note()}")


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--atol", type=float, default=None, help="absolute tolerance of the parity check (default 1e-4)"
    )
    parser.add_argument(
        "--rtol", type=float, default=None, help="relative tolerance of the parity check (default 1e-3)"
    )
    parser.add_argument("--report", metavar="PATH", help="write the JSON report to PATH")
    parser.add_argument(
        "--json", action="store_true", help="print the JSON report on stdout (human output stays on stderr)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only errors and the verdict on stderr")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug", action="store_true", help=f"print the traceback of an error (or set {DEBUG_VARIABLE}=1)"
    )


def emit_report(report: dict, args: argparse.Namespace) -> None:
    text = json.dumps(report, indent=2, default=str)
    if args.report:
        write_atomically(args.report, lambda stream: stream.write((text + "\n").encode()), flag="--report")
    if args.json:
        print(text, flush=True)


def debug_enabled(flag: bool = False) -> bool:
    return flag or os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread like Ctrl-C's KeyboardInterrupt (a subclass of it), so every
    `finally`, `with` block and `except KeyboardInterrupt` that cleans up after Ctrl-C also runs for them."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def stop_signals_as_interrupts() -> Iterator[None]:
    """While the block runs, SIGTERM and SIGHUP raise `Stopped` in the main thread (the first one only: a
    second signal must not cut short the cleanup the first one started); the previous handlers are restored
    after. A signal the process ignores (nohup) stays ignored; outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised: list[int] = []

    def handler(signum, _frame):
        if not raised:
            raised.append(signum)
            raise Stopped(signum)

    previous = {}
    try:
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, handler)
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def run_command(main: Callable[[], int], debug: Optional[bool] = False) -> int:
    """Turn typed errors into one line on stderr and their exit code, and anything else into one
    'unexpected' line and exit 3; tracebacks only with --debug / TOME_DEBUG=1. SIGTERM and SIGHUP stop the
    command as Ctrl-C does (exit 143 / 129, Ctrl-C 130), and every staged or temporary output is removed."""
    caught: BaseException
    try:
        with stop_signals_as_interrupts():
            try:
                return main()
            finally:
                discard_temporaries()  # a temporary file a stop signal left between its creation and its `with`
    except ToMeError as err:
        code, line, caught = err.exit_code, f"error: {err}", err
    except Stopped as err:
        code, line, caught = 128 + err.signum, f"error: stopped by {signal.Signals(err.signum).name}", err
    except KeyboardInterrupt as err:
        code, line, caught = 130, "error: interrupted", err
    except Exception as err:  # noqa: BLE001 - the last guard: a bug, reported as one line
        code, line, caught = 3, f"error: {error_reason(err)} ({UNEXPECTED})", err
    if debug_enabled(bool(debug)):
        traceback.print_exception(caught, file=sys.stderr)
    print(" ".join(line.splitlines()), file=sys.stderr, flush=True)
    return code
