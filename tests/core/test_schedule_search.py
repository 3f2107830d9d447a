"""The schedules the quality search tries (core/schedule_search.py): structured shapes and the greedy allocation."""

from __future__ import annotations

import time

from tome_deploy.core.schedule import ModelShape, resolve_schedule
from tome_deploy.core.schedule_search import greedy_allocation, structured_candidates
from tome_deploy.errors import ScheduleError

# The digits ViT's shape: 64 patches and a class token, 6 blocks.
DIGITS = ModelShape(tokens=65, depth=6, num_prefix=1, width=96, mlp_ratio=4.0, grid=(8, 8))


def test_structured_candidates_are_distinct_clamp_free_schedules_of_each_shape():
    candidates = structured_candidates(DIGITS)
    schedules = [c.r_per_layer for c in candidates]
    assert len(schedules) == len(set(schedules))
    for candidate in candidates:
        resolved = resolve_schedule(list(candidate.r_per_layer), 65, 6, 1, strict=True)  # raises if it clamps
        assert tuple(resolved.effective) == candidate.r_per_layer
    by_label = {c.label: c for c in candidates}
    assert by_label["r=3"].r_per_layer == (3, 3, 3, 3, 3, 3)
    assert by_label["r=(3,-1)"].r_per_layer == (6, 4, 3, 2, 1, 0)  # int(6 - 6/5 * block)
    assert by_label["r=4 in every 2nd block"].r_per_layer == (0, 4, 0, 4, 0, 4)
    assert by_label["r=4 in every 3rd block"].r_per_layer == (0, 0, 4, 0, 0, 4)
    # 65 tokens, 6 blocks: r=5 leaves 35; r=6 would need 65 - 5 * 12 = 5 tokens at block 5, which holds 2 of 4.
    constants = [c.r_per_layer[0] for c in candidates if c.kind == "constant"]
    assert constants == list(range(1, max(constants) + 1))
    assert all(c.kind in ("constant", "decreasing", "sparse") for c in candidates)


def test_greedy_adds_merges_only_where_they_cost_nothing():
    # Merging in blocks 0-2 costs quality, in blocks 3-5 none: the search must never touch blocks 0-2.
    def loss(r):
        return float(sum(r[:3]))

    path = greedy_allocation(DIGITS, loss, step=1)
    assert path, "the search found nothing to merge"
    assert all(c.r_per_layer[:3] == (0, 0, 0) for c in path)
    assert [sum(c.r_per_layer) for c in path] == list(range(1, len(path) + 1))  # one merge per step
    # It stops only when blocks 3-5 cannot take another merge without clamping.
    last = path[-1].r_per_layer
    for block in (3, 4, 5):
        more = list(last)
        more[block] += 1
        try:
            resolve_schedule(more, 65, 6, 1, strict=True)
            clamps = False
        except ScheduleError:
            clamps = True
        assert clamps, f"block {block} could still merge at {last}"


def test_greedy_stops_at_the_budget():
    # The budget allows at most 7 merges in all; every schedule on the path is inside it.
    def loss(r):
        return 0.0 if sum(r) <= 7 else None

    path = greedy_allocation(DIGITS, loss, step=1)
    assert len(path) == 7
    assert sum(path[-1].r_per_layer) == 7
    assert all(c.kind == "greedy" for c in path)


def test_greedy_prefers_the_block_with_the_least_loss_per_flop():
    # Equal quality cost per merge everywhere: a merge in an earlier block saves more FLOPs (its tokens are gone
    # from every later block), so the first step goes to block 0.
    def loss(r):
        return float(sum(r))

    path = greedy_allocation(DIGITS, loss, step=1)
    assert path[0].r_per_layer == (1, 0, 0, 0, 0, 0)


def test_greedy_respects_its_deadline():
    assert greedy_allocation(DIGITS, lambda r: 0.0, step=1, deadline=time.monotonic() - 1) == []
