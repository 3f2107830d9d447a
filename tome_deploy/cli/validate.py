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
        "ONNX Runtime) against PyTorch on random, constant and natural images; with --data, measure its quality "
        "against the plain (unmerged) model on a folder of your images.",
        epilog=exit_codes_help(1, 4, 5),
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
    _add_quality_arguments(parser)
    add_debug_argument(parser)
    return parser


def _add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    from tome_deploy.quality.metrics import EMBEDDING_METRICS, LOGITS_METRICS

    quality = parser.add_argument_group("quality on your images (--data)")
    quality.add_argument(
        "--data",
        metavar="DIR",
        help="measure quality against the plain model on every image of DIR: DIR/<class>/<image> (classes by index "
        "or --labels) or DIR/<image> (no labels)",
    )
    quality.add_argument("--labels", metavar="FILE", help="class names, one per line (line number = class index)")
    quality.add_argument("--max-drop", type=float, metavar="P", help="fail (exit 5) above P points of accuracy drop")
    quality.add_argument(
        "--min-agreement", type=float, metavar="F", help="fail (exit 5) below a top-1 agreement of F (0..1)"
    )
    quality.add_argument(
        "--min-cosine", type=float, metavar="F", help="fail (exit 5) below a mean cosine of F (embedding outputs)"
    )
    quality.add_argument(
        "--metric",
        choices=LOGITS_METRICS + EMBEDDING_METRICS,
        help="the headline metric (default accuracy_drop with labels, else top1_agreement; cosine_mean for "
        "embeddings); an embedding metric treats the output as an embedding",
    )
    quality.add_argument(
        "--batch-size", type=int, metavar="B", help="images per run (default the artifact's batch or 8)"
    )


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


_QUALITY_FLAGS = ("labels", "max_drop", "min_agreement", "min_cosine", "metric", "batch_size")
_PARITY_FLAGS = ("batch_sizes", "save_reference", "atol", "rtol")


def _check_flags(args: argparse.Namespace) -> None:
    """Quality flags only with --data, parity-check flags only without it."""
    from tome_deploy.errors import InvalidInputError

    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    if args.data is None:
        given = [flag(name) for name in _QUALITY_FLAGS if getattr(args, name) is not None]
        if given:
            raise InvalidInputError(f"{given[0]} measures quality on your images; add --data DIR")
    else:
        given = [flag(name) for name in _PARITY_FLAGS if getattr(args, name) is not None]
        if given:
            raise InvalidInputError(f"{given[0]} belongs to the parity check, which --data replaces; drop one of them")


def _validate(args: argparse.Namespace) -> int:
    from tome_deploy.validation.compare import check_tolerances

    _check_flags(args)
    check_tolerances(args.atol, args.rtol)
    if args.data is not None:
        return _validate_quality(args)
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


def _validate_quality(args: argparse.Namespace) -> int:
    from tome_deploy.errors import QualityBudgetError
    from tome_deploy.jobs.validate import validate_quality, validation_inputs
    from tome_deploy.output_files import check_outputs
    from tome_deploy.quality.budget import Budget

    check_outputs(
        {"--report": args.report}, inputs=(args.source, args.checkpoint, args.labels, *validation_inputs(args.onnx))
    )
    budget = Budget(max_drop=args.max_drop, min_agreement=args.min_agreement, min_cosine=args.min_cosine)
    report = validate_quality(
        model_source(args),
        args.onnx,
        args.data,
        labels_file=args.labels,
        budget=budget,
        metric=args.metric,
        batch_size=args.batch_size,
        runtime=args.runtime,
        say=(lambda _: None) if args.quiet else say,
    )
    if not args.quiet:
        say(
            f"{report.artifact} vs the plain model on {report.images - report.unreadable} images of {report.data}"
            f" ({report.unreadable} unreadable), {report.kind} output; * = headline metric"
        )
        say(report.table())
    emit_report({"quality": report.to_dict()}, args)
    violations = report.violations
    if violations:
        raise QualityBudgetError(f"quality budget not met: {'; '.join(violations)}")
    headline = report.metrics[report.metric]
    say(f"PASS: {report.metric} {headline.value:.4g} within the budget ({budget.describe()})")
    return 0


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
