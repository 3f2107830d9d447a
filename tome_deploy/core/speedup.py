"""Pick a merge schedule from a speedup target: the smallest r whose FLOPs ratio reaches it, then the
smallest whose measured speedup does.

A sparse schedule is "r in every `stride`-th block": stride 1 is the paper's constant schedule; stride 2
merges in blocks 1, 3, 5, ... (twice the r in half the blocks), which pays the fixed per-block cost of
matching half as often: what small models and batch 1 need (`sparse_schedule`).

The ratio is the theoretical one of `flops.theoretical_speedup` (docs/design.md#the-flop-rule) over the token
counts `resolve_schedule` gives, clamping included. Tokens per layer never grow with r, so the ratio never
drops as r grows: the first r that reaches the target is the smallest, and the largest useful r,
(tokens - prefix) // 2, merges as much as any schedule can (half the patch tokens of every layer)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from tome_deploy.core.flops import theoretical_speedup
from tome_deploy.core.schedule import ModelShape, RSpec, requested_r_per_layer, resolve_schedule
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


# The strides a measured search tries, in order: the constant schedule first (the paper's best accuracy
# for its FLOPs), then sparser ones, each only over the r that merge less than the last schedule that
# reached the target (`search_measured_schedule`).
SEARCH_STRIDES = (1, 2, 3)


def sparse_schedule(r: int, stride: int, depth: int) -> RSpec:
    """r in blocks stride-1, 2*stride-1, ... and 0 elsewhere: [0, r, 0, r, ...] for stride 2; stride 1 is
    the constant schedule, the plain int r (what `--r r` gives).

    Block 0 never merges under a stride > 1: its tokens carry the least context (merging 16 of 65 tokens
    there costs the digits ViT 7.5 points of top-1, merging them in block 2 costs none)."""
    if stride < 1:
        raise ScheduleError(f"a schedule stride must be at least 1, got {stride}")
    if stride == 1:
        return r
    return [r if (block + 1) % stride == 0 else 0 for block in range(depth)]


def max_useful_r(num_tokens: int, num_prefix: int) -> int:
    """Beyond this r, every layer is clamped to the same effective r: nothing changes."""
    return max(0, (num_tokens - num_prefix) // 2)


def largest_r(num_tokens: int, depth: int, num_prefix: int, strict: bool = False, stride: int = 1) -> int:
    """The largest r worth trying at a stride: max_useful_r, or under strict the largest that needs
    no clamping."""
    r = max_useful_r(num_tokens, num_prefix)
    while strict and r > 0:
        try:
            resolve_schedule(sparse_schedule(r, stride, depth), num_tokens, depth, num_prefix, strict=True)
            break
        except ScheduleError:
            r -= 1
    return r


def stride_speedup(
    r: int,
    num_tokens: int,
    depth: int,
    num_prefix: int,
    dim: int,
    mlp_ratio: float,
    strict: bool = False,
    stride: int = 1,
) -> float:
    """The FLOPs ratio of sparse_schedule(r, stride, depth), clamping included (ScheduleError under strict
    when it clamps)."""
    schedule = resolve_schedule(sparse_schedule(r, stride, depth), num_tokens, depth, num_prefix, strict=strict)
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
    stride: int = 1,
) -> tuple[int, float]:
    """(smallest r of `sparse_schedule(r, stride)` whose theoretical speedup is >= target, that speedup).

    num_tokens counts patch and prefix tokens at the first block. With strict=True only schedules that
    need no clamping are candidates (as `--strict` would refuse the others). Raises ScheduleError when no
    candidate reaches the target, naming the best reachable ratio (for stride 1, the constant schedule,
    no schedule of any shape merges more).
    """
    target = check_target(target)
    if depth < 1 or num_tokens <= num_prefix or dim < 1:
        raise ScheduleError(
            f"cannot plan a schedule for {num_tokens} tokens ({num_prefix} prefix), depth {depth}, dim {dim}"
        )
    best_r, best = 0, 1.0
    for r in range(0, max_useful_r(num_tokens, num_prefix) + 1):
        try:
            ratio = stride_speedup(r, num_tokens, depth, num_prefix, dim, mlp_ratio, strict, stride)
        except ScheduleError:
            break  # strict: this r and every larger one would be clamped somewhere
        if ratio >= target:
            return r, ratio
        best_r, best = r, ratio
    if stride > 1:
        raise ScheduleError(
            f"a {target:.2f}x FLOPs speedup is out of reach merging in {every_block(stride)}: "
            f"the most (r={best_r}) gives {best:.2f}x"
        )
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


def speedup_choice(shape: ModelShape, target: float, *, strict: bool = False, stride: int = 1) -> SpeedupChoice:
    """schedule_for_speedup for a model's shape, with its real MLP width (as the export's metadata counts
    it), so the predicted ratio is the one the export reports."""
    r, predicted = schedule_for_speedup(
        shape.tokens, shape.depth, shape.num_prefix, shape.width, target, shape.mlp_ratio, strict=strict, stride=stride
    )
    return SpeedupChoice(float(target), r, predicted)


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
        return (
            f"target {self.target:.2f}x not reached in {where}: the best measured is r={self.r} at "
            f"{self.speedup:.2f}x (tried {tried})"
        )

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "r": self.r,
            "reached": self.reached,
            "measured": {str(r): round(s, 4) for r, s in self.measured.items()},
        }


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
        best = max(measured, key=lambda candidate: measured[candidate])
        return MeasuredChoice(target, best, False, measured)
    low, high = r_first, r_last  # at(low) < target <= at(high)
    while high - low > 1:
        middle = (low + high) // 2
        if at(middle) >= target:
            high = middle
        else:
            low = middle
    return MeasuredChoice(target, high, True, measured)


def every_block(stride: int) -> str:
    """ "every block", "every 2nd block", "every 3rd block", "every 4th block", ..."""
    if stride == 1:
        return "every block"
    return f"every {stride}{ {2: 'nd', 3: 'rd'}.get(stride, 'th') } block"


def stride_label(r: int, stride: int) -> str:
    """How r at a stride reads in a line: "r=5", "r=10 in every 2nd block"."""
    return f"r={r}" if stride == 1 else f"r={r} in {every_block(stride)}"


def schedule_option(r: int, stride: int, depth: int) -> str:
    """The tome-export option that exports r at a stride: "--r 5" or "--schedule 0,10,0,10"."""
    spec = sparse_schedule(r, stride, depth)
    if isinstance(spec, int):
        return f"--r {spec}"
    return "--schedule " + ",".join(str(v) for v in spec)


@dataclass(frozen=True)
class ScheduleSearch:
    """A speedup target measured over schedule strides: each stride's search (`search_measured_r`), in
    the order searched. The choice is the last search that reached the target (each later stride is only
    searched below the FLOPs of the last reached one, so it merges the least); when none did, the best
    measured schedule of all."""

    target: float
    depth: int
    searches: tuple[tuple[int, MeasuredChoice], ...]  # (stride, its search)

    @property
    def chosen(self) -> tuple[int, MeasuredChoice]:
        reached = [item for item in self.searches if item[1].reached]
        if reached:
            return reached[-1]
        return max(self.searches, key=lambda item: item[1].speedup)

    @property
    def reached(self) -> bool:
        return self.chosen[1].reached

    @property
    def stride(self) -> int:
        return self.chosen[0]

    @property
    def r(self) -> int:
        return self.chosen[1].r

    @property
    def speedup(self) -> float:
        return self.chosen[1].speedup

    @property
    def schedule(self) -> RSpec:
        return sparse_schedule(self.r, self.stride, self.depth)

    def label(self) -> str:
        return stride_label(self.r, self.stride)

    def option(self) -> str:
        return schedule_option(self.r, self.stride, self.depth)

    def line(self, where: str) -> str:
        tried = ", ".join(
            f"{stride_label(r, stride)}: {s:.2f}x"
            for stride, search in self.searches
            for r, s in search.measured.items()
        )
        if self.reached:
            return (
                f"target {self.target:.2f}x -> {self.label()} ({self.option()}), measured {self.speedup:.2f}x "
                f"in {where} (tried {tried})"
            )
        return (
            f"target {self.target:.2f}x not reached in {where}: the best measured is {self.label()} "
            f"({self.option()}) at {self.speedup:.2f}x (tried {tried})"
        )

    def to_dict(self) -> dict:
        return {
            "target": self.target,
            "reached": self.reached,
            "stride": self.stride,
            "r": self.r,
            "r_per_layer": requested_r_per_layer(self.schedule, self.depth),
            "measured": [
                {"stride": stride, "r": r, "speedup": round(s, 4)}
                for stride, search in self.searches
                for r, s in search.measured.items()
            ],
        }


def search_measured_schedule(target: float, depth: int, strides, measure, flops) -> ScheduleSearch:
    """The schedule that reaches a measured `target` with the least merging (the smallest FLOPs ratio,
    so the least accuracy given up), over schedule strides.

    strides: (stride, r_first, r_last) in the order to search; each is searched with `search_measured_r`.
    Once one reached the target at FLOPs ratio F, a later stride is searched only over its r whose
    FLOPs stay below F, and skipped when none does: a sparse schedule is chosen only when it merges
    less than the constant one that also reaches the target. measure(r, stride) -> measured speedup of
    sparse_schedule(r, stride, depth); flops(r, stride) -> its FLOPs ratio.
    """
    target = check_target(target)
    searches = []
    bound = math.inf
    for stride, r_first, r_last in strides:
        while r_last >= r_first and flops(r_last, stride) >= bound:
            r_last -= 1
        if r_last < r_first:
            continue
        search = search_measured_r(target, r_first, r_last, lambda r, stride=stride: measure(r, stride))
        searches.append((stride, search))
        if search.reached:
            bound = flops(search.r, stride)
    if not searches:
        raise ScheduleError(f"no schedule stride to search for a {target:.2f}x target")
    return ScheduleSearch(target, depth, tuple(searches))
