"""tome-validate: compare a tome-deploy ONNX file with the PyTorch ToMe model it was exported from."""

from __future__ import annotations

import argparse
import sys

from tome_deploy.cli.common import (
    add_debug_argument,
    add_model_arguments,
    add_report_arguments,
    emit_report,
    exit_codes_help,
    model_source,
    run_command,
    say,
)
from tome_deploy.runtime.factory import CPU_RUNTIMES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tome-validate",
        description="Check an exported ToMe ONNX file (ONNX Runtime or OpenVINO) or engine (TensorRT, and its ONNX file in "
        "ONNX Runtime) against PyTorch on random, constant and natural images.",
        epilog=exit_codes_help(1, 4),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "onnx", metavar="ARTIFACT", help="an ONNX file written by tome-export or an engine written by tome-build"
    )
    parser.add_argument("--batch-sizes", metavar="B1,B2,...", help="batch sizes to check (default: exported, 1 and 3)")
    parser.add_argument(
        "--save-reference",
        metavar="REF.json",
        help="also write the PyTorch outputs (and REF_inputs.json) in Polygraphy's format for "
        "`polygraphy run ... --load-inputs --load-outputs`",
    )
    parser.add_argument(
        "--runtime",
        choices=CPU_RUNTIMES,
        default="onnxruntime",
        help="what runs an ONNX file: onnxruntime (default) or openvino (pip install 'tome-deploy[openvino]')",
    )
    add_report_arguments(parser)
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _validate(args), args.debug)


def _parse_batches(text: str | None) -> list[int] | None:
    if text is None:
        return None
    from tome_deploy.artifact.spec import EXPORT_SPEC
    from tome_deploy.errors import InvalidInputError

    try:
        sizes = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InvalidInputError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes:
        raise InvalidInputError(f"--batch-sizes must be positive integers, got {text!r}")
    for size in sizes:
        EXPORT_SPEC.check_batch(size, "--batch-sizes")
    return sizes


def _validate(args: argparse.Namespace) -> int:
    from tome_deploy.jobs.validate import validate_model, validation_inputs
    from tome_deploy.output_files import check_outputs
    from tome_deploy.validation.polygraphy_reference import inputs_path_for

    reference = args.save_reference
    check_outputs(
        {
            "--report": args.report,
            "--save-reference": reference,
            "--save-reference inputs": inputs_path_for(reference) if reference else None,
        },
        inputs=(args.source, args.checkpoint, *validation_inputs(args.onnx)),
    )
    metadata, report = validate_model(
        model_source(args),
        args.onnx,
        batch_sizes=_parse_batches(args.batch_sizes),
        atol=args.atol,
        rtol=args.rtol,
        save_reference=args.save_reference,
        runtime=args.runtime,
        say=(lambda _: None) if args.quiet else say,
    )
    if not args.quiet:
        say(f"{metadata.model}: r per layer {metadata.r_effective}, merge={metadata.merge}")
        say(report.table())
    failed = sum(not v.passed for v in report.verdicts)
    say(
        f"{'PASS' if report.passed else 'FAIL'}: {len(report.verdicts) - failed}/{len(report.verdicts)} parity checks passed"
    )
    emit_report({"metadata": metadata.to_dict(), "validation": report.to_dict()}, args)
    return 0 if report.passed else 1


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
