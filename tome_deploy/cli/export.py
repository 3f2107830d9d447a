"""tome-export: timm ViT -> fixed-shape ToMe ONNX, validated in ONNX Runtime."""

from __future__ import annotations

import argparse
import sys

from tome_deploy.artifact.formulations import all_formulations, either, formulation_names
from tome_deploy.artifact.spec import (
    EXPORT_SPEC,
    PRECISIONS,
    TARGET_DEFAULT_MERGE,
    TARGETS,
)
from tome_deploy.cli.common import (
    add_debug_argument,
    add_model_arguments,
    add_report_arguments,
    add_schedule_arguments,
    emit_report,
    exit_codes_help,
    model_source,
    run_command,
    say,
    say_clamp_note,
    schedule_spec,
)
from tome_deploy.core.speedup import check_target
from tome_deploy.errors import InvalidInputError
from tome_deploy.onnx_export.quantize import INT8_MODES, check_int8_options
from tome_deploy.runtime.factory import CPU_RUNTIMES, RUNTIME_LABELS
from tome_deploy.validation.compare import check_tolerances

DEFAULT_R = "16"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tome-export",
        description="Rewrite a timm Vision Transformer with Token Merging and export it to a fixed-shape ONNX file.",
        epilog=exit_codes_help(1, 4, c3="export failed or unexpected error (please report it)"),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="PATH",
        help="ONNX file to write, or with --runtime openvino an OpenVINO IR: NAME.xml (its weights go to NAME.bin)",
    )
    schedule = add_schedule_arguments(parser, DEFAULT_R)
    schedule.add_argument(
        "--target-speedup",
        type=float,
        metavar="X",
        help="pick the smallest r whose speedup, measured in --runtime at --batch-size against the "
        "unmerged export, reaches X (the search starts where the FLOPs reach X); then it "
        "searches r in every 2nd and every 3rd block (fewer blocks pay the fixed cost of "
        "matching) below the FLOPs of that r, and exports the schedule that reaches X with the "
        "least merging; implies --measure",
    )
    parser.add_argument(
        "--schedule-from",
        metavar="TUNE_JSON",
        help="export the schedule tome-tune chose (chosen.r_per_layer of its tune.json) and record the quality "
        "it measured in the artifact (tome.quality); the tune.json must be for the same weights; instead of "
        "--r, --r-inflect, --schedule and --target-speedup",
    )
    parser.add_argument(
        "--no-sparse",
        action="store_true",
        help="with --target-speedup: search constant r only (every block merges), never a sparse schedule",
    )
    parser.add_argument(
        "--merge",
        choices=formulation_names(),
        default=None,
        help=f"merge formulation: {either(f'{f.name} ({f.description})' for f in all_formulations())}; "
        "default: the --target's",
    )
    parser.add_argument(
        "--target",
        choices=TARGETS,
        default="onnxruntime",
        help="runtime the export is for: onnxruntime (default) or tensorrt (TensorRT / TensorRT-RTX); "
        f"{'; '.join(target_merges(target) for target in TARGETS)}",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32; fp16: weights and activations in fp16 with fp32 matching and fp32 inputs/outputs (what "
        "strongly typed TensorRT builds need for fp16); bf16: an OpenVINO IR (--runtime openvino -o NAME.xml) "
        "whose attention and MLP MatMuls compute in bf16 and whose matching stays f32; int8: the attention and "
        "MLP MatMuls quantized by the runtime's own quantizer, matching in f32. bf16 and int8 are validated by "
        "their agreement with the fp32 ToMe model (top-1/top-5, cosine, merge choices)",
    )
    int8 = parser.add_argument_group("int8 (--precision int8)")
    int8.add_argument(
        "--data",
        metavar="DIR",
        help="calibration images for static int8: DIR/<class>/<image> (classes named 0, 1, ... or by --labels) or "
        "a flat folder, read and split as tome-tune does; up to 128 images of its calibration part are used",
    )
    int8.add_argument(
        "--labels", metavar="FILE", help="class names of --data, one per line (line number = class index)"
    )
    int8.add_argument(
        "--quantization",
        choices=INT8_MODES,
        help="dynamic (ONNX Runtime only: weights int8, activations quantized as they are computed; no images) or "
        "static (calibrated on --data: QDQ for ONNX Runtime, NNCF for OpenVINO); default: static with --data, "
        "dynamic without it (OpenVINO: static)",
    )
    parser.add_argument("--img-size", type=int, metavar="N", help="input resolution (default: the model's)")
    parser.add_argument(
        "--batch-size", type=int, default=1, metavar="N", help="batch size of the traced example (default 1)"
    )
    parser.add_argument("--static-batch", action="store_true", help="fix the batch dimension to --batch-size")
    parser.add_argument(
        "--opset",
        type=int,
        default=EXPORT_SPEC.default_opset,
        help=f"ONNX opset (default {EXPORT_SPEC.default_opset}, at least {EXPORT_SPEC.min_opset})",
    )
    parser.add_argument(
        "--runtime",
        choices=CPU_RUNTIMES,
        default="onnxruntime",
        help="CPU runtime that validates and times the export: onnxruntime (default) or openvino "
        f"(needs pip install 'tome-deploy[openvino]'; no --merge {either(refused_by('openvino'))})",
    )
    parser.add_argument(
        "--external-data",
        action="store_true",
        help="write the weights to PATH.data beside the ONNX graph (ONNX external data, one file) even when the "
        f"model fits in one file; a model with over {EXPORT_SPEC.single_file_max_weight_bytes >> 20} MiB of weights "
        "always is written so "
        "(protobuf holds under 2 GiB)",
    )
    parser.add_argument("--no-validate", action="store_true", help="skip the parity check in --runtime")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also export the plain model (torch.onnx.export of the same weights) and time both in --runtime",
    )
    add_report_arguments(parser)
    add_debug_argument(parser)
    return parser


def check_schedule_from(args: argparse.Namespace) -> None:
    """--schedule-from is the whole schedule: refuse it next to another option that sets one."""
    if args.schedule_from is None:
        return
    others = {
        "--r": args.r,
        "--r-inflect": args.r_inflect,
        "--schedule": args.schedule,
        "--target-speedup": args.target_speedup,
    }
    given = [name for name, value in others.items() if value is not None]
    if given:
        raise InvalidInputError(
            f"--schedule-from takes the schedule from the tune.json; drop {' and '.join(given)} (or drop --schedule-from)"
        )


def target_merges(target: str) -> str:
    """'tensorrt: --merge matmul, scatter refused': the default formulation of `target` and those it refuses."""
    refused = refused_by(target, targets=True)
    return f"{target}: --merge {TARGET_DEFAULT_MERGE[target]}" + (f", {either(refused)} refused" if refused else "")


def refused_by(place: str, targets: bool = False) -> list[str]:
    """Names of the formulations that the target (targets=True) or runtime `place` refuses."""
    return [
        f.name for f in all_formulations() if not (f.supports_target(place) if targets else f.supports_runtime(place))
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _export(args), args.debug)


def _export(args: argparse.Namespace) -> int:
    from tome_deploy.output_files import check_outputs

    check_outputs(
        {"-o": args.output, "--report": args.report},
        inputs=(args.source, args.checkpoint, args.schedule_from, args.labels),
    )
    check_schedule_from(args)
    check_tolerances(args.atol, args.rtol)
    if args.labels is not None and args.data is None:
        raise InvalidInputError("--labels names the classes of --data; add --data DIR or drop --labels")
    check_int8_options(args.precision, args.runtime, args.data, args.quantization)
    target = args.target_speedup
    if target is not None:
        if args.r is not None:
            raise InvalidInputError(
                "--target-speedup picks r itself; drop --r (or drop --target-speedup to set r by hand)"
            )
        target = check_target(target)
    elif args.no_sparse:
        raise InvalidInputError(
            "--no-sparse only shapes the --target-speedup search; add --target-speedup X, or drop --no-sparse"
        )

    from tome_deploy.jobs.export import (
        export_model,
    )

    r_spec = schedule_spec(args, DEFAULT_R)
    quiet = args.quiet
    outcome = export_model(
        model_source(args),
        args.output,
        r=r_spec,
        merge=args.merge,
        target=args.target,
        precision=args.precision,
        opset=args.opset,
        batch_size=args.batch_size,
        static_batch=args.static_batch,
        strict=args.strict,
        validate=not args.no_validate,
        atol=args.atol,
        rtol=args.rtol,
        measure=args.measure or target is not None,
        target_speedup=target,
        runtime=args.runtime,
        sparse=not args.no_sparse,
        schedule_from=args.schedule_from,
        external_data=args.external_data,
        data=args.data,
        labels=args.labels,
        quantization=args.quantization,
        say=(lambda _: None) if quiet else say,
    )
    meta = outcome.export.metadata
    if not quiet:
        prefix = f"{meta.num_prefix_tokens} prefix token{'' if meta.num_prefix_tokens == 1 else 's'}"
        say(f"\nSchedule ({meta.model}, {outcome.schedule.depth} blocks, {prefix}):")
        say(outcome.schedule.table())
        say_clamp_note(outcome.schedule, say)
        say(
            f"\nTokens {meta.tokens_per_layer[0]} -> {meta.tokens_per_layer[-1]}; theoretical speedup (FLOPs): {meta.theoretical_speedup:.2f}x"
        )
    runtime = RUNTIME_LABELS[outcome.runtime]
    if outcome.timings:
        base, tome = outcome.timings["unmerged"], outcome.timings["tome"]
        say(
            f"Measured in {runtime} (CPU, batch {tome.batch}): unmerged {base.images_per_s:.1f} img/s, "
            f"ToMe {tome.images_per_s:.1f} img/s -> {outcome.measured_speedup:.2f}x"
        )
        if outcome.measured_speedup is not None and outcome.measured_speedup < 1:
            say(
                f"note: ToMe is SLOWER than the unmerged model here ({outcome.measured_speedup:.2f}x): matching and "
                "merging add a fixed cost per block that the removed tokens do not pay back on a model this small "
                f"at batch {tome.batch}; use the unmerged model, or measure at a larger --batch-size"
            )
    if outcome.search is not None and not quiet:
        say(outcome.search.line(f"{runtime} (CPU)"))
    if outcome.validation is not None:
        if not quiet:
            say(f"\nParity, PyTorch vs {runtime}:")
            say(outcome.validation.table())
        checks = len(outcome.validation.verdicts)
        failed = sum(not v.passed for v in outcome.validation.verdicts)
        say(f"{'PASS' if outcome.validation.passed else 'FAIL'}: {checks - failed}/{checks} parity checks passed")
    if not outcome.written:
        say(
            f"{args.output} was not written (an existing file there is unchanged); fix the cause, or pass --no-validate to keep a failing export"
        )
    if outcome.loaded.random_weights:
        say(
            f"note: {meta.model} has random weights (seed {outcome.loaded.seed}); pass --pretrained or --checkpoint for a useful model"
        )
    emit_report(
        {
            "onnx": str(outcome.export.path) if outcome.written else None,
            "onnx_external_data": str(outcome.external_data) if outcome.written and outcome.external_data else None,
            "metadata": meta.to_dict(),
            "clamped_layers": outcome.schedule.clamped_layers,
            "clamp_note": outcome.schedule.clamp_note() or None,
            "validation": outcome.validation.to_dict() if outcome.validation else None,
            "measured_speedup": outcome.measured_speedup,
            "target_speedup": outcome.target.to_dict() if outcome.target else None,
            "measured_search": outcome.search.to_dict() if outcome.search else None,
            "runtime": outcome.runtime,
        },
        args,
    )
    return 0 if outcome.validation is None or outcome.validation.passed else 1


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
