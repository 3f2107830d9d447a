"""What the benchmark scripts share: exporting the unmerged baseline next to ToMe variants through the
library's export job, comma-separated options, and the table / JSON output. Imported by name
(`from common import ...`), as the scripts are run from anywhere with `python benchmarks/NAME.py`."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from tome_deploy.core.schedule import RSpec
from tome_deploy.jobs.export import ExportOutcome, export_model
from tome_deploy.models.loading.source import ModelSource
from tome_deploy.onnx_export.export import export_plain

BASELINE = "unmerged"
# The schedules the ONNX Runtime and serving benchmarks offer, by label.
SCHEDULES: dict[str, RSpec] = {"r=8": 8, "r=16": 16, "r=(16,-1)": (16, -1.0)}


def export_variants(
    model: str,
    schedules: dict[str, RSpec],
    folder: Path,
    *,
    plain: bool = False,
    img_size: Optional[int] = None,
    **options,
) -> dict[str, ExportOutcome]:
    """tome-export's job for r=0 ("unmerged") and each labelled schedule, unvalidated. The same model name
    and seed give every variant the same weights (checked on the recorded fingerprints). plain=True: the
    baseline is instead what a user has without ToMe, a plain torch.onnx.export of the same weights.
    img_size: the input resolution (`--img-size`; None: the model's)."""
    outcomes = {}
    stem = file_stem(model) + ("" if img_size is None else f"_{img_size}")
    source = ModelSource(model, img_size=img_size)
    for label, r in {BASELINE: 0, **schedules}.items():
        start = time.perf_counter()
        outcomes[label] = export_model(
            source, folder / f"{stem}_{file_stem(label)}.onnx", r=r, validate=False, **options
        )
        print(f"  exported {model} {label} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    fingerprints = {outcome.export.metadata.weights_sha256 for outcome in outcomes.values()}
    if len(fingerprints) != 1:
        raise SystemExit(
            f"the exports of {model} do not share their weights; a side-by-side timing would compare different models"
        )
    if plain:
        base = outcomes[BASELINE]
        path = export_plain(base.loaded.model, base.export.metadata, folder / f"{stem}_plain.onnx")
        outcomes[BASELINE] = dataclasses.replace(base, export=dataclasses.replace(base.export, path=path))
    return outcomes


def file_stem(name: str) -> str:
    """A model source ('open_clip:ViT-B-32', '/path/to/hf_folder') or label ('r=(16,-1)') as one file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def whole_numbers(text: str) -> list[int]:
    """'1,8,64' -> [1, 8, 64]."""
    return [int(item) for item in text.split(",") if item.strip()]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; the first column is left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(rows: list[dict], path: Optional[str]) -> None:
    """--json PATH: the rows as JSON (nothing when no path was given)."""
    if path:
        Path(path).write_text(json.dumps(rows, indent=2) + "\n")
