"""tome-validate: compare a tome-deploy ONNX file with the PyTorch ToMe model it was exported from."""

from __future__ import annotations

import argparse
import sys

from tome_deploy.cli.common import (
    EXIT_CODES_HELP,
    add_model_arguments,
    add_report_arguments,
    check_report_path,
    emit_report,
    model_source,
    run_command,
    say,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tome-validate",
        description="Check an exported ToMe ONNX file (ONNX Runtime) or engine (TensorRT, and its ONNX file in "
                    "ONNX Runtime) against PyTorch on random, constant and natural images.",
        epilog=EXIT_CODES_HELP,
    )
    add_model_arguments(parser)
    parser.add_argument("onnx", metavar="ARTIFACT", help="an ONNX file written by tome-export or an engine written by tome-build")
    parser.add_argument("--batch-sizes", metavar="B1,B2,...", help="batch sizes to check (default: exported, 1 and 3)")
    parser.add_argument("--save-reference", metavar="REF.json",
                        help="also write the PyTorch outputs (and REF_inputs.json) in Polygraphy's format for "
                             "`polygraphy run ... --load-inputs --load-outputs`")
    add_report_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _validate(args))


def _parse_batches(text: str | None) -> list[int] | None:
    if text is None:
        return None
    from tome_deploy.errors import InvalidInputError

    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidInputError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise InvalidInputError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def _validate(args: argparse.Namespace) -> int:
    from tome_deploy.jobs.validate import validate_model

    check_report_path(args)
    metadata, report = validate_model(
        model_source(args), args.onnx, batch_sizes=_parse_batches(args.batch_sizes),
        atol=args.atol, rtol=args.rtol, save_reference=args.save_reference, say=(lambda _: None) if args.quiet else say,
    )
    if not args.quiet:
        say(f"{metadata.model}: r per layer {metadata.r_effective}, merge={metadata.merge}")
        say(report.table())
    failed = sum(not v.passed for v in report.verdicts)
    say(f"{'PASS' if report.passed else 'FAIL'}: {len(report.verdicts) - failed}/{len(report.verdicts)} parity checks passed")
    emit_report({"metadata": metadata.__dict__, "validation": report.to_dict()}, args)
    return 0 if report.passed else 1


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
