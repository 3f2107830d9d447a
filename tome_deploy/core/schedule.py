"""Merge schedules: the requested r per layer, and the effective r and token counts it gives.

Every shape of a ToMe model follows from (tokens at input, depth, schedule, prefix count), which is why
the exported graph can be fully static apart from the batch dimension."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence, Union

from tome_deploy.errors import ScheduleError

# An int r for every layer, (r, inflect) for a linear ramp, or an explicit per-layer list.
RSpec = Union[int, tuple[int, float], Sequence[int]]


def _check_r(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ScheduleError(f"{what} must be a non-negative integer, got {value!r}; pass e.g. 16")
    if value < 0:
        raise ScheduleError(f"{what} must be a non-negative integer, got {value}; use 0 to disable merging")
    return int(value)


def requested_r_per_layer(spec: RSpec, depth: int) -> list[int]:
    """Expand a schedule spec to one requested r per layer (the paper's rules)."""
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ScheduleError(f"an inflected schedule is (r, inflect), got {spec!r}")
        r = _check_r(spec[0], "r")
        inflect = spec[1]
        if not isinstance(inflect, (int, float)) or isinstance(inflect, bool) or not -1 <= inflect <= 1:
            raise ScheduleError(
                f"inflect must be a number in [-1, 1], got {inflect!r}; -1 is the paper's decreasing schedule"
            )
        first = int(r * (1.0 - inflect))
        last = 2 * r - first
        if depth == 1:
            return [first]
        step = (last - first) / (depth - 1)
        return [int(first + step * layer) for layer in range(depth)]
    if isinstance(spec, (list, tuple)) or (hasattr(spec, "__iter__") and not isinstance(spec, (str, bytes))):
        values = [_check_r(v, f"r of layer {i}") for i, v in enumerate(spec)]
        if len(values) > depth:
            raise ScheduleError(
                f"the schedule lists {len(values)} layers but the model has {depth} blocks; "
                f"give at most {depth} values (missing layers get r=0)"
            )
        return values + [0] * (depth - len(values))
    return [_check_r(spec, "r")] * depth


@dataclass(frozen=True)
class ModelShape:
    """What schedules, FLOPs and merge maps need to know of a model (models/adapter.py `describe` gives it)."""

    tokens: int  # patch plus prefix tokens entering the first block
    depth: int  # transformer blocks
    num_prefix: int  # tokens at the front that never merge (class, distillation, registers)
    width: int  # C, the width of the tokens
    mlp_ratio: float  # the MLP's real width as the FLOP rule's ratio (its weights over 2 C^2)
    grid: tuple[int, ...]  # the patch grid, one entry per patched axis: (rows, columns) for an image


@dataclass(frozen=True)
class Schedule:
    """A schedule resolved against one model: what was asked and what will run."""

    requested: tuple[int, ...]  # r asked for each layer
    effective: tuple[int, ...]  # r each layer really merges
    tokens: tuple[int, ...]  # tokens entering each layer, plus the final count
    num_prefix: int

    @property
    def depth(self) -> int:
        return len(self.requested)

    @property
    def clamped_layers(self) -> list[int]:
        return [i for i, (asked, got) in enumerate(zip(self.requested, self.effective)) if asked != got]

    def clamp_note(self) -> str:
        """One line that explains the clamping; empty when no layer was clamped."""
        if not self.clamped_layers:
            return ""
        return (
            f"r was clamped in layers {self.clamped_layers}: a layer can merge at most half of its non-prefix "
            f"tokens, (tokens - {self.num_prefix} prefix) // 2, so those layers merge fewer "
            f"(effective r {list(self.effective)}); lower r or pass a per-layer schedule to choose yourself"
        )

    def table(self) -> str:
        """Human table: one line per layer."""
        lines = ["layer  tokens_in  r_requested  r_effective  tokens_out"]
        for i, (asked, got) in enumerate(zip(self.requested, self.effective)):
            mark = "  (clamped)" if asked != got else ""
            lines.append(f"{i:>5}  {self.tokens[i]:>9}  {asked:>11}  {got:>11}  {self.tokens[i + 1]:>10}{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "r_requested": list(self.requested),
            "r_effective": list(self.effective),
            "tokens_per_layer": list(self.tokens),
            "num_prefix_tokens": self.num_prefix,
        }


def resolve_schedule(spec: RSpec, num_tokens: int, depth: int, num_prefix: int, strict: bool = False) -> Schedule:
    """Clamp each layer's r to (tokens - prefix) // 2. Clamping is data (`Schedule.clamped_layers`,
    `Schedule.clamp_note`); strict=True raises ScheduleError instead."""
    requested = requested_r_per_layer(spec, depth)
    effective, tokens = [], [num_tokens]
    for r in requested:
        r_eff = max(0, min(r, (tokens[-1] - num_prefix) // 2))
        effective.append(r_eff)
        tokens.append(tokens[-1] - r_eff)
    schedule = Schedule(tuple(requested), tuple(effective), tuple(tokens), num_prefix)
    if strict and schedule.clamped_layers:
        raise ScheduleError(schedule.clamp_note() + " (--strict turns clamping into this error)")
    return schedule


def parse_r_text(text: str) -> int | float | str:
    """--r's text as a number when it is one; anything else is left for requested_r_per_layer to name."""
    try:
        value = float(text)
    except ValueError:
        return text
    return int(value) if value.is_integer() else value


def parse_r_arguments(r: str | int, inflect: float | None, layers: str | None) -> RSpec:
    """The CLI's --r / --r-inflect / --schedule trio -> one RSpec (--r as text or a number)."""
    value: Any = parse_r_text(r) if isinstance(r, str) else r  # its type is checked by resolve_schedule
    if layers is not None:
        entries = layers.replace(" ", "").split(",")
        if entries[-1] == "" and len(entries) > 1:
            entries.pop()  # one trailing comma: "1,2," is "1,2"
        if not all(entries):
            raise ScheduleError(
                f"--schedule must be comma-separated integers, one per layer from the first, got {layers!r}; "
                "for no merging pass --r 0"
            )
        try:
            return [int(v) for v in entries]
        except ValueError:
            raise ScheduleError(f"--schedule must be comma-separated integers, got {layers!r}") from None
    if inflect is not None:
        if not math.isfinite(inflect):
            raise ScheduleError(f"--r-inflect must be a finite number in [-1, 1], got {inflect}")
        return (value, inflect)
    return value
