"""What ToMe buys on a trained model: held-out accuracy vs ONNX Runtime throughput of the digits ViT.

For r = 0 .. the largest constant r that needs no clamping (about 8-10 points), plus decreasing
(r, -1) schedules: apply ToMe, measure top-1 on the held-out digits in PyTorch, export to ONNX,
measure top-1 in ONNX Runtime (the predictions must be identical; every mismatch is printed), then time
all exports interleaved in one ONNX Runtime run against r = 0. Prints a markdown table and writes a plot.

    pip install -e ".[viz]"
    python benchmarks/accuracy_vs_speed.py            # table to stdout, plot and JSON to benchmarks/out/
    python benchmarks/accuracy_vs_speed.py --docs docs/accuracy_vs_speed.png   # also replace the plot of the README and docs/benchmarks.md
    python benchmarks/accuracy_vs_speed.py --batch 64 --rounds 20 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from tome_deploy.core.schedule import resolve_schedule
from tome_deploy.jobs.export import export_model
from tome_deploy.models.adapter import adapter_for, describe
from tome_deploy.models.digits import ARCH, digits_test_set, load_digits_vit
from tome_deploy.models.loading.fingerprint import weights_fingerprint
from tome_deploy.models.patch import apply_tome
from tome_deploy.runtime.factory import open_runner
from tome_deploy.runtime.throughput import time_interleaved

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64, help="ONNX Runtime timing batch (default 64)")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved timing rounds (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores)")
    parser.add_argument("--merge", default="scatter", choices=("scatter", "matmul"))
    parser.add_argument("--points", type=int, default=10, help="about this many constant-r points (default 10)")
    parser.add_argument(
        "--inflected",
        default="mid,max",
        help="(r, -1) schedules: comma list of r values, or mid/max of the constant range",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out", help="plot and JSON folder")
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        metavar="PNG",
        help="also copy the plot there, e.g. docs/accuracy_vs_speed.png to update the tracked README "
        "image (default: benchmarks/out/ only)",
    )
    return parser.parse_args()


def _unclamped(spec, model) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shape = describe(adapter_for(model), model)
        schedule = resolve_schedule(spec, shape.tokens, shape.depth, shape.num_prefix)
    return not schedule.clamped_layers


def max_constant_r(model) -> int:
    """The largest constant r whose every layer merges r tokens (no clamping)."""
    r = 0
    while _unclamped(r + 1, model):
        r += 1
    return r


def schedules(model, points: int, inflected: str) -> list[tuple[str, object]]:
    top = max_constant_r(model)
    step = max(1, math.ceil(top / max(1, points - 1)))
    values = list(range(0, top + 1, step))
    if values[-1] != top:
        values.append(top)
    out: list[tuple[str, object]] = [(f"r={r}", r) for r in values]
    for item in [s.strip() for s in inflected.split(",") if s.strip()]:
        r = {"mid": values[len(values) // 2], "max": top}.get(item)
        r = int(item) if r is None else r
        if _unclamped((r, -1.0), model):
            out.append((f"r=({r},-1)", (r, -1.0)))
        else:
            print(f"skipping r=({r},-1): it would clamp", file=sys.stderr)
    return out


def main() -> int:
    args = parse_args()
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    model = load_digits_vit()
    fingerprint = weights_fingerprint(model)
    pixels, labels = digits_test_set()
    feed_pixels = pixels.numpy()
    rows: list[dict] = []
    mismatches_total = 0
    with tempfile.TemporaryDirectory() as folder:
        paths: dict[str, Path] = {}
        for label, spec in schedules(model, args.points, args.inflected):
            tome, schedule = apply_tome(model, spec, args.merge, strict=True)
            with torch.inference_mode():
                torch_logits = tome(pixels).numpy()
            start = time.perf_counter()
            export = export_model(
                ARCH, Path(folder) / f"{label}.onnx", r=spec, merge=args.merge, strict=True, validate=False
            ).export
            meta, paths[label] = export.metadata, export.path
            if meta.weights_sha256 != fingerprint:
                raise SystemExit(f"the export of {label} did not use the bundled weights ({meta.weights})")
            with open_runner(paths[label], threads=args.threads) as runner:
                ort_logits = runner.infer({meta.input.name: feed_pixels})[meta.output_name]
            torch_pred, ort_pred = torch_logits.argmax(-1), ort_logits.argmax(-1)
            differ = np.flatnonzero(torch_pred != ort_pred)
            for index in differ:
                top2 = np.sort(torch_logits[index])[-2:]
                say(
                    f"  MISMATCH {label} image {index}: PyTorch {torch_pred[index]} vs ORT {ort_pred[index]} "
                    f"(label {int(labels[index])}, PyTorch top-2 margin {top2[1] - top2[0]:.2e})"
                )
            mismatches_total += len(differ)
            labels_np = labels.numpy()
            rows.append(
                {
                    "schedule": label,
                    "spec": list(spec) if isinstance(spec, tuple) else spec,
                    "r_per_layer": list(schedule.effective),
                    "tokens_out": schedule.tokens[-1],
                    "flops_speedup": meta.theoretical_speedup,
                    "torch_top1": float((torch_pred == labels_np).mean()),
                    "ort_top1": float((ort_pred == labels_np).mean()),
                    "mismatches": int(len(differ)),
                    "max_abs_logit_diff": float(np.abs(torch_logits - ort_logits).max()),
                }
            )
            say(
                f"  {label}: exported in {time.perf_counter() - start:.1f} s, PyTorch top-1 {rows[-1]['torch_top1']:.2%}, "
                f"ORT top-1 {rows[-1]['ort_top1']:.2%}, {len(differ)} prediction mismatches"
            )
        say(
            f"timing {len(paths)} exports interleaved in ONNX Runtime (CPU, batch {args.batch}, {args.rounds} rounds) ..."
        )
        timings = time_interleaved(
            paths, "pixel_values", list(pixels.shape[1:]), args.batch, rounds=args.rounds, threads=args.threads
        )
    base = timings["r=0"].median_s
    for row in rows:
        timing = timings[row["schedule"]]
        row["ort_img_s"] = timing.images_per_s
        row["measured_speedup"] = base / timing.median_s

    print(markdown_table(rows, len(labels), args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy_vs_speed.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot_path = plot(rows, args.out / "accuracy_vs_speed.png", args)
    if plot_path is not None and args.docs is not None:
        args.docs.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plot_path, args.docs)
        say(f"wrote {plot_path} and {args.docs}")
    elif plot_path is not None:
        say(f"wrote {plot_path} (pass --docs docs/accuracy_vs_speed.png to update the plots in the docs)")
    if mismatches_total:
        say(f"FAIL: {mismatches_total} PyTorch vs ONNX Runtime prediction mismatches")
        return 1
    return 0


def markdown_table(rows: list[dict], test_size: int, args: argparse.Namespace) -> str:
    lines = [
        f"Held-out digits ({test_size} images), `{ARCH}` (committed weights), merge={args.merge}; "
        f"ONNX Runtime CPU, batch {args.batch}, {args.rounds} interleaved rounds, median.",
        "",
        "| schedule | r per layer | tokens out | FLOPs speedup | PyTorch top-1 | ORT top-1 | mismatches | ORT img/s | measured speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['schedule']} | {','.join(str(r) for r in row['r_per_layer'])} | {row['tokens_out']} | "
            f"{row['flops_speedup']:.2f}x | {100 * row['torch_top1']:.2f}% | {100 * row['ort_top1']:.2f}% | "
            f"{row['mismatches']} | {row['ort_img_s']:,.0f} | {row['measured_speedup']:.2f}x |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, args: argparse.Namespace) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[viz]"); no plot written', file=sys.stderr)
        return None
    constant = [row for row in rows if not isinstance(row["spec"], list)]
    ramps = [row for row in rows if isinstance(row["spec"], list)]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.plot([r["ort_img_s"] for r in constant], [100 * r["ort_top1"] for r in constant], "o-", label="constant r")
    if ramps:
        ax.plot(
            [r["ort_img_s"] for r in ramps],
            [100 * r["ort_top1"] for r in ramps],
            "s",
            color="tab:red",
            label="decreasing (r, -1)",
        )
    for row in rows:
        ax.annotate(
            row["schedule"].replace("r=", ""),
            (row["ort_img_s"], 100 * row["ort_top1"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    base = rows[0]
    ax.axhline(100 * base["ort_top1"] - 2, color="grey", linestyle=":", linewidth=1, label="r=0 minus 2 points")
    ax.set_xlabel(f"ONNX Runtime CPU throughput (images/s, batch {args.batch})")
    ax.set_ylabel("held-out top-1 (%)")
    ax.set_title(f"ToMe on {ARCH}: accuracy vs speed")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
