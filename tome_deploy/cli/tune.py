"""tome-tune: choose the schedule by the quality it costs on your own images, measured in the target runtime."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tome_deploy.artifact.spec import EXPORT_SPEC, TUNE_PRECISIONS, artifact_suffix
from tome_deploy.cli.common import (
    add_debug_argument,
    add_model_arguments,
    exit_codes_help,
    model_source,
    run_command,
    say,
)
from tome_deploy.errors import InvalidInputError, MissingDependencyError
from tome_deploy.runtime.factory import CPU_RUNTIMES

QUALITY_METRICS = ("top1_agreement", "accuracy_drop", "cosine_mean")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tome-tune",
        description="Search ToMe schedules on calibration images and keep the fastest one within a quality "
        "budget, measured on held-out images in the target runtime. Write the result to tune.json for "
        "tome-export --schedule-from.",
        epilog=exit_codes_help(4, c2="bad input, or no schedule fits the budget (the line names the best one found)"),
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="images: DIR/<class>/<image> (classes named 0, 1, ... or by --labels) or a flat folder without labels",
    )
    parser.add_argument(
        "--labels", metavar="FILE", help="class names, one per line (the line number is the class index)"
    )
    parser.add_argument("-o", "--output", required=True, metavar="PATH", help="tune.json to write")
    budget = parser.add_argument_group("budget (one of)")
    budget.add_argument(
        "--max-drop", type=float, metavar="POINTS", help="largest top-1 accuracy drop, in points (labels)"
    )
    budget.add_argument(
        "--min-agreement", type=float, metavar="F", help="least top-1 agreement with the unmerged model"
    )
    budget.add_argument("--min-cosine", type=float, metavar="F", help="least mean cosine to the unmerged embedding")
    parser.add_argument("--target-speedup", type=float, metavar="X", help="also require a measured speedup of X")
    parser.add_argument(
        "--metric", choices=QUALITY_METRICS, help="the quality to bound (default: the one the budget flag names)"
    )
    parser.add_argument(
        "--runtime", choices=CPU_RUNTIMES, default="onnxruntime", help="where speed and quality are measured"
    )
    parser.add_argument(
        "--precision",
        choices=TUNE_PRECISIONS,
        default="fp32",
        help="the precision that will ship: candidates are measured as that artifact (bf16: an OpenVINO IR, needs "
        "--runtime openvino; int8: the runtime's quantizer) against the plain fp32 export, and so is the plain "
        "model in it (the stacking plain fp32 -> plain reduced -> ToMe reduced); the search itself scores in "
        "fp32 PyTorch (default fp32)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="batch of the speed measurement (default 8)"
    )
    parser.add_argument(
        "--held-out",
        type=float,
        default=0.5,
        metavar="F",
        help="share of the images held out from the search (default 0.5)",
    )
    parser.add_argument("--split-seed", type=int, default=0, metavar="N", help="seed of the split (default 0)")
    parser.add_argument(
        "--max-minutes", type=float, metavar="M", help="stop searching after M minutes (default: no limit)"
    )
    parser.add_argument(
        "--cache", metavar="PATH", help="keep measurements here and resume from them (default: OUTPUT.cache.json)"
    )
    parser.add_argument("--no-greedy", action="store_true", help="search the structured schedules only")
    parser.add_argument("--plot", metavar="PNG", help="also draw measured speedup against quality (needs matplotlib)")
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _tune(args), args.debug)


def _tune(args: argparse.Namespace) -> int:
    from tome_deploy.quality.budget import Budget

    budget = Budget(max_drop=args.max_drop, min_agreement=args.min_agreement, min_cosine=args.min_cosine)
    check_budget_flags(budget)
    if args.plot is not None:
        _require_matplotlib()
    if not 0 < args.held_out < 1:
        raise InvalidInputError(f"--held-out is the held-out share, between 0 and 1 (exclusive), got {args.held_out}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise InvalidInputError(f"--max-minutes must be positive, got {args.max_minutes}")
    EXPORT_SPEC.check_precision(
        args.precision, args.runtime, "candidate" + artifact_suffix(args.precision, args.runtime)
    )
    from tome_deploy.jobs.tune import tune_model  # torch and the exporter: only once the flags are good

    outcome = tune_model(
        model_source(args),
        args.data,
        args.output,
        budget=budget,
        labels=args.labels,
        target_speedup=args.target_speedup,
        metric=args.metric,
        runtime=args.runtime,
        batch_size=args.batch_size,
        held_out_fraction=args.held_out,
        split_seed=args.split_seed,
        max_minutes=args.max_minutes,
        cache=args.cache if args.cache is not None else f"{args.output}.cache.json",
        greedy=not args.no_greedy,
        precision=args.precision,
        say=say,
    )
    say("")
    say(table(outcome))
    if outcome.images.unreadable:
        say(f"{len(outcome.images.unreadable)} unreadable files were skipped")
    if outcome.timed_out:
        say("note: --max-minutes stopped the search; run again with the same --cache to resume it")
    chosen = outcome.chosen
    say(
        f"\nChosen: {chosen.schedule.label} ({chosen.measured_speedup:.2f}x measured, {chosen.theoretical_speedup:.2f}x FLOPs); "
        f"held-out {outcome.metric} {chosen.held_out[outcome.metric].value:.4g} within {outcome.budget.describe()}"
    )
    if outcome.plain_reduced is not None:
        say(stacking_line(outcome))
    if outcome.best_constant is not None and outcome.best_constant is not chosen:
        best = outcome.best_constant
        say(f"The fastest constant r within the budget: {best.schedule.label} at {best.measured_speedup:.2f}x")
    say(
        f"wrote {args.output} in {outcome.seconds / 60:.1f} min; export it with: tome-export {args.source} --schedule-from {args.output} -o OUT.onnx"
    )
    if args.plot is not None:
        plot_pareto(outcome, Path(args.plot))
        say(f"wrote {args.plot}")
    return 0


def stacking_line(outcome) -> str:
    """'Stacking (held-out top1_agreement): plain fp32 1.00x -> plain bf16 1.90x (0.998) -> ToMe bf16 3.40x (0.97)'."""
    metric, plain, chosen = outcome.metric, outcome.plain_reduced, outcome.chosen
    return (
        f"Stacking against plain fp32 (held-out {metric}): plain fp32 1.00x -> plain {outcome.precision} "
        f"{plain['measured_speedup']:.2f}x ({plain['held_out'][metric]:.4g}) -> ToMe {outcome.precision} "
        f"{chosen.measured_speedup:.2f}x ({chosen.held_out[metric].value:.4g})"
    )


def check_budget_flags(budget) -> None:
    """Refuse out-of-range bounds with the flag's name, before anything heavy is imported."""
    if budget.max_drop is not None and not 0 <= budget.max_drop <= 100:
        raise InvalidInputError(f"--max-drop is in points of accuracy, from 0 to 100, got {budget.max_drop}")
    for flag, value in (("--min-agreement", budget.min_agreement), ("--min-cosine", budget.min_cosine)):
        if value is not None and not -1 <= value <= 1:
            raise InvalidInputError(f"{flag} must be from -1 to 1, got {value}")


def table(outcome) -> str:
    """One row per schedule measured in the runtime (held-out numbers), the chosen one marked with *."""
    names = list(outcome.chosen.held_out)
    header = f"   {'schedule':28} {'FLOPs':>6} {'measured':>8}  " + "  ".join(f"{name:>22}" for name in names)
    rows = [header]
    for candidate in sorted(outcome.measured, key=lambda c: -(c.measured_speedup or 0)):
        mark = "*" if candidate is outcome.chosen else ("-" if not candidate.within_budget else " ")
        cells = "  ".join(
            f"{e.value:8.4g} [{e.low:.4g}, {e.high:.4g}]".rjust(22) for e in (candidate.held_out[n] for n in names)
        )
        rows.append(
            f"{mark}  {candidate.schedule.label:28} {candidate.theoretical_speedup:5.2f}x "
            f"{candidate.measured_speedup:7.2f}x  {cells}"
        )
    rows.append("* chosen, - outside the budget on the held-out images; intervals: 95%")
    return "\n".join(rows)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError("--plot needs matplotlib: pip install 'tome-deploy[viz]'") from err


def plot_pareto(outcome, path: Path) -> None:
    """Measured speedup against the held-out budget metric, every measured schedule, the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = outcome.metric
    figure, axes = plt.subplots(figsize=(6, 4))
    for kind, marker in (("constant", "o"), ("decreasing", "s"), ("sparse", "^"), ("greedy", "D")):
        points = [c for c in outcome.measured if c.schedule.kind == kind]
        if points:
            axes.scatter(
                [c.held_out[metric].value for c in points],
                [c.measured_speedup for c in points],
                marker=marker,
                label=kind,
                alpha=0.7,
            )
    chosen = outcome.chosen
    axes.scatter(
        [chosen.held_out[metric].value],
        [chosen.measured_speedup],
        s=200,
        facecolors="none",
        edgecolors="red",
        linewidths=2,
        label=f"chosen: {chosen.schedule.label}",
    )
    axes.set_xlabel(f"held-out {metric}")
    axes.set_ylabel(f"measured speedup ({outcome.runtime}, batch {outcome.batch_size})")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    from tome_deploy.output_files import write_atomically

    write_atomically(path, lambda stream: figure.savefig(stream, format="png", dpi=120), flag="--plot")
    plt.close(figure)


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
