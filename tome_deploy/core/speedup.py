"""Pick a merge schedule from a speedup target: the smallest constant r whose FLOPs ratio reaches it.

The ratio is the theoretical one of `flops.theoretical_speedup` (FACTS §7 counting rule) over the token
counts `resolve_schedule` gives, clamping included. Tokens per layer never grow with r, so the ratio never
drops as r grows: the first r that reaches the target is the smallest, and the largest useful r,
(tokens - prefix) // 2, merges as much as any schedule can (half the patch tokens of every layer)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from tome_deploy.core.flops import theoretical_speedup
from tome_deploy.core.schedule import resolve_schedule
from tome_deploy.errors import ScheduleError


@dataclass(frozen=True)
class SpeedupChoice:
    """What a speedup target turned into."""

    target: float
    r: int
    predicted: float  # FLOPs ratio of the chosen r

    def line(self) -> str:
        return f"target {self.target:.2f}x -> r={self.r}, predicted {self.predicted:.2f}x (FLOPs)"

    def to_dict(self) -> dict:
        return {"target": self.target, "r": self.r, "predicted_flops": round(self.predicted, 4)}


def max_useful_r(num_tokens: int, num_prefix: int) -> int:
    """Beyond this r, every layer is clamped to the same effective r: nothing changes."""
    return max(0, (num_tokens - num_prefix) // 2)


def largest_r(num_tokens: int, depth: int, num_prefix: int, strict: bool = False) -> int:
    """The largest constant r worth trying: max_useful_r, or under strict the largest that needs no clamping."""
    r = max_useful_r(num_tokens, num_prefix)
    while strict and r > 0:
        try:
            resolve_schedule(r, num_tokens, depth, num_prefix, strict=True)
            break
        except ScheduleError:
            r -= 1
    return r


def _speedup(r: int, num_tokens: int, depth: int, num_prefix: int, dim: int, mlp_ratio: float, strict: bool) -> float:
    schedule = resolve_schedule(r, num_tokens, depth, num_prefix, strict=strict)
    return theoretical_speedup(schedule.tokens, dim, mlp_ratio)


def check_target(target: object) -> float:
    """A finite speedup target >= 1, as a float; ScheduleError otherwise."""
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not math.isfinite(float(target)):
        raise ScheduleError(f"a speedup target must be a finite number, got {target!r}; pass e.g. 2.0")
    target = float(target)
    if target < 1.0:
        raise ScheduleError(f"a speedup target must be at least 1.0 (no merging), got {target}; pass e.g. 2.0")
    return target


def schedule_for_speedup(
    num_tokens: int,
    depth: int,
    num_prefix: int,
    dim: int,
    target: float,
    mlp_ratio: float = 4.0,
    *,
    strict: bool = False,
) -> tuple[int, float]:
    """(smallest constant r whose theoretical speedup is >= target, that speedup).

    num_tokens counts patch and prefix tokens at the first block. With strict=True only schedules that
    need no clamping are candidates (as `--strict` would refuse the others). Raises ScheduleError when no
    candidate reaches the target, naming the best reachable ratio.
    """
    target = check_target(target)
    if depth < 1 or num_tokens <= num_prefix or dim < 1:
        raise ScheduleError(
            f"cannot plan a schedule for {num_tokens} tokens ({num_prefix} prefix), depth {depth}, dim {dim}"
        )
    best_r, best = 0, 1.0
    for r in range(0, max_useful_r(num_tokens, num_prefix) + 1):
        try:
            ratio = _speedup(r, num_tokens, depth, num_prefix, dim, mlp_ratio, strict)
        except ScheduleError:
            break  # strict: this r and every larger one would be clamped somewhere
        if ratio >= target:
            return r, ratio
        best_r, best = r, ratio
    if strict:
        raise ScheduleError(
            f"a {target:.2f}x FLOPs speedup needs clamping at this depth: the best constant r without clamping "
            f"(r={best_r} over {depth} layers of {num_tokens} tokens) gives {best:.2f}x; ask for at most "
            f"{math.floor(best * 100) / 100:.2f}x, drop --strict, or use a decreasing schedule (--r-inflect -1, --schedule)"
        )
    raise ScheduleError(
        f"a {target:.2f}x FLOPs speedup is out of reach for {num_tokens} tokens ({num_prefix} prefix) over {depth} "
        f"layers: merging the most any schedule can (r={best_r}, half the patch tokens per layer) gives {best:.2f}x; "
        f"ask for at most {math.floor(best * 100) / 100:.2f}x (no constant, inflected or per-layer schedule merges more)"
    )


@dataclass(frozen=True)
class MeasuredChoice:
    """What a speedup target turned into once measured: the r chosen and every r tried on the way."""

    target: float
    r: int
    reached: bool  # False: no r up to the largest useful one measured the target; r is the best measured
    measured: dict[int, float]  # r -> measured speedup, in the order tried

    @property
    def speedup(self) -> float:
        return self.measured[self.r]

    def line(self, where: str) -> str:
        tried = ", ".join(f"r={r}: {s:.2f}x" for r, s in self.measured.items())
        if self.reached:
            return f"target {self.target:.2f}x -> r={self.r}, measured {self.speedup:.2f}x in {where} (tried {tried})"
        return (f"target {self.target:.2f}x not reached in {where}: the best measured is r={self.r} at "
                f"{self.speedup:.2f}x (tried {tried})")

    def to_dict(self) -> dict:
        return {"target": self.target, "r": self.r, "reached": self.reached,
                "measured": {str(r): round(s, 4) for r, s in self.measured.items()}}


def search_measured_r(target: float, r_first: int, r_last: int, measure) -> MeasuredChoice:
    """The smallest r in [r_first, r_last] whose measured speedup reaches `target`, by bisection.

    measure(r) -> measured speedup (ToMe vs unmerged, on the runtime and batch that matter). r_first is
    where the FLOPs say the target starts to be possible (the measured ratio rarely beats the FLOP ratio);
    r_last is the most merging there is. Bisection assumes the measured speedup grows with r, as the
    FLOPs do; it measures at most ~log2(r_last - r_first) + 2 schedules. When even r_last falls short,
    the result is not `reached` and names the best r measured.
    """
    target = check_target(target)
    measured: dict[int, float] = {}

    def at(r: int) -> float:
        if r not in measured:
            measured[r] = float(measure(r))
        return measured[r]

    if at(r_first) >= target:
        return MeasuredChoice(target, r_first, True, measured)
    if r_last <= r_first or at(r_last) < target:
        best = max(measured, key=measured.get)
        return MeasuredChoice(target, best, False, measured)
    low, high = r_first, r_last  # at(low) < target <= at(high)
    while high - low > 1:
        middle = (low + high) // 2
        if at(middle) >= target:
            high = middle
        else:
            low = middle
    return MeasuredChoice(target, high, True, measured)
