"""Schedules a quality search tries: the structured shapes, and a greedy per-layer allocation of merges.

Pure functions over a model's shape; how a schedule is judged is the caller's `loss` (quality lost on
calibration images, or None when it leaves the budget), so the search itself reads no data."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from tome_deploy.core.flops import transformer_flops
from tome_deploy.core.schedule import ModelShape, resolve_schedule
from tome_deploy.core.speedup import SEARCH_STRIDES, largest_r, sparse_schedule, stride_label
from tome_deploy.errors import ScheduleError

CandidateKind = str  # "constant", "decreasing", "sparse", "greedy"


@dataclass(frozen=True)
class ScheduleCandidate:
    label: str  # how it reads in a table: "r=5", "r=(5,-1)", "r=10 in every 2nd block", "greedy 7"
    kind: CandidateKind
    r_per_layer: tuple[int, ...]  # the effective r of every block (no clamping left to do)


def effective_r(spec, shape: ModelShape) -> Optional[tuple[int, ...]]:
    """The per-block r a schedule spec gives on `shape`, or None when it would clamp (not a distinct schedule)."""
    try:
        schedule = resolve_schedule(spec, shape.tokens, shape.depth, shape.num_prefix, strict=True)
    except ScheduleError:
        return None
    return tuple(schedule.effective)


def flops(r_per_layer: tuple[int, ...], shape: ModelShape) -> float:
    """FLOPs of the blocks under a clamp-free per-block schedule."""
    schedule = resolve_schedule(list(r_per_layer), shape.tokens, shape.depth, shape.num_prefix)
    return transformer_flops(schedule.tokens, shape.width, shape.mlp_ratio)


def structured_candidates(shape: ModelShape, strides=SEARCH_STRIDES) -> list[ScheduleCandidate]:
    """Constant r, the paper's decreasing (r, -1), and r in every 2nd / 3rd block, for every r that needs no
    clamping; each distinct per-block schedule once, in that order."""
    seen: set[tuple[int, ...]] = set()
    found: list[ScheduleCandidate] = []

    def add(label: str, kind: CandidateKind, spec) -> None:
        r_per_layer = effective_r(spec, shape)
        if r_per_layer is not None and any(r_per_layer) and r_per_layer not in seen:
            seen.add(r_per_layer)
            found.append(ScheduleCandidate(label, kind, r_per_layer))

    top = largest_r(shape.tokens, shape.depth, shape.num_prefix, strict=True)
    for r in range(1, top + 1):
        add(f"r={r}", "constant", r)
    for r in range(1, 2 * top + 1):
        add(f"r=({r},-1)", "decreasing", (r, -1.0))
    for stride in strides[1:]:
        if stride > shape.depth:
            break
        for r in range(1, largest_r(shape.tokens, shape.depth, shape.num_prefix, True, stride) + 1):
            add(stride_label(r, stride), "sparse", sparse_schedule(r, stride, shape.depth))
    return found


def greedy_step(shape: ModelShape) -> int:
    """Merges added to one block per greedy step: 1 for small token counts, about N / (8 depth) above."""
    return max(1, shape.tokens // (8 * shape.depth))


def greedy_allocation(
    shape: ModelShape,
    loss: Callable[[tuple[int, ...]], Optional[float]],
    *,
    step: Optional[int] = None,
    deadline: Optional[float] = None,
) -> list[ScheduleCandidate]:
    """Training-free per-layer search: from no merging, repeatedly add `step` merges to the block where the
    quality lost per FLOP saved is smallest, until every addition leaves the budget (loss None), would clamp,
    or `deadline` (time.monotonic()) passes. Returns every schedule on the path, fewest merges first.

    loss(r_per_layer): the quality lost on the calibration images (0 for none; may be negative), or None
    when that schedule is outside the budget."""
    step = step or greedy_step(shape)
    current = tuple([0] * shape.depth)
    current_loss, current_flops = 0.0, flops(current, shape)
    path: list[ScheduleCandidate] = []
    while deadline is None or time.monotonic() < deadline:
        best: Optional[tuple[float, tuple[int, ...], float, float]] = None
        for block in range(shape.depth):
            trial = tuple(r + step if i == block else r for i, r in enumerate(current))
            if effective_r(list(trial), shape) != trial:
                continue  # clamps: this block cannot merge that many more
            trial_loss = loss(trial)
            if trial_loss is None:
                continue
            trial_flops = flops(trial, shape)
            ratio = (trial_loss - current_loss) / max(current_flops - trial_flops, 1.0)
            if best is None or ratio < best[0]:
                best = (ratio, trial, trial_loss, trial_flops)
        if best is None:
            break
        _, current, current_loss, current_flops = best
        path.append(ScheduleCandidate(f"greedy {len(path) + 1}", "greedy", current))
    return path
