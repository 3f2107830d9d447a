"""Schedules (docs/design.md#schedules) and the theoretical speedup (docs/design.md#the-flop-rule)."""

from __future__ import annotations

import warnings

import pytest

from tome_deploy.core import flops
from tome_deploy.core.schedule import Schedule, requested_r_per_layer, resolve_schedule
from tome_deploy.errors import ScheduleError, ToMeError


def _ramp(r, inflect, depth):
    """The paper's parse_r ramp written out plainly."""
    first = int(r * (1.0 - inflect))
    last = 2 * r - first
    return [int(first + (last - first) / (depth - 1) * layer) for layer in range(depth)]


def _clamped_tokens(r_layers, num_tokens, num_prefix):
    tokens = [num_tokens]
    for r in r_layers:
        tokens.append(tokens[-1] - max(0, min(r, (tokens[-1] - num_prefix) // 2)))
    return tokens


def _flops(tokens, dim):
    """The FLOP rule: attention 8NC^2 + 4N^2C at the input count, MLP 16NC^2 at the output count."""
    total = 0
    for n_in, n_out in zip(tokens[:-1], tokens[1:]):
        total += 8 * n_in * dim**2 + 4 * n_in**2 * dim + 16 * n_out * dim**2
    return total


# ---------------------------------------------------------------------------------------------
# requested_r_per_layer
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("r,depth", [(0, 12), (1, 1), (8, 12), (16, 12), (5, 3)])
def test_constant(r, depth):
    assert requested_r_per_layer(r, depth) == [r] * depth


def test_decreasing_16_on_12_layers():
    got = requested_r_per_layer((16, -1), 12)
    assert got == _ramp(16, -1, 12)
    assert got == [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]  # spelled out once, by hand


@pytest.mark.parametrize(
    "r,inflect,depth",
    [(16, -1, 12), (16, 1, 12), (8, 0.5, 12), (8, -0.5, 24), (13, 0, 12), (4, -1, 6), (7, 0.3, 9), (3, -1.0, 2)],
)
def test_inflected_ramps(r, inflect, depth):
    got = requested_r_per_layer((r, inflect), depth)
    assert got == _ramp(r, inflect, depth)
    assert len(got) == depth and all(isinstance(v, int) for v in got)


def test_inflect_zero_is_constant_and_plus_one_is_increasing():
    assert requested_r_per_layer((9, 0), 6) == [9] * 6
    inc = requested_r_per_layer((10, 1.0), 11)
    assert inc == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]


@pytest.mark.parametrize(
    "spec,depth,want", [([3, 2, 1], 5, [3, 2, 1, 0, 0]), ([], 3, [0, 0, 0]), ([4] * 4, 4, [4] * 4)]
)
def test_list_padding(spec, depth, want):
    assert requested_r_per_layer(spec, depth) == want


@pytest.mark.parametrize(
    "spec",
    [
        -1,
        1.5,
        "3",
        None,
        True,
        [1, -2, 3],
        [1, 2.5],
        [1, "3"],
        (-4, 0.0),
        (2.5, 0.0),
        (4, 1.5),
        (4, -1.01),
        (4, float("nan")),
        (4, "0.5"),
        (4, 0.5, 1),
    ],
)
def test_bad_specs_raise_schedule_error(spec):
    with pytest.raises(ScheduleError):
        requested_r_per_layer(spec, 4)


def test_list_longer_than_depth_raises():
    with pytest.raises(ScheduleError):
        requested_r_per_layer([1, 1, 1, 1, 1], 4)


def test_schedule_error_is_typed():
    assert issubclass(ScheduleError, ToMeError) and issubclass(ScheduleError, ValueError)


# ---------------------------------------------------------------------------------------------
# resolve_schedule
# ---------------------------------------------------------------------------------------------
def test_resolve_without_clamping_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule = resolve_schedule(8, 197, 12, 1)
    assert isinstance(schedule, Schedule)
    assert schedule.requested == (8,) * 12 and schedule.effective == (8,) * 12
    assert schedule.tokens == tuple(_clamped_tokens([8] * 12, 197, 1))
    assert schedule.tokens[-1] == 197 - 96
    assert schedule.clamped_layers == [] and schedule.depth == 12 and schedule.num_prefix == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schedule = resolve_schedule((16, -1), 197, 12, 1, strict=True)  # the paper's schedule fits ViT-B
    assert schedule.tokens == tuple(_clamped_tokens(_ramp(16, -1, 12), 197, 1))
    assert schedule.tokens[-1] == 197 - sum(_ramp(16, -1, 12))


@pytest.mark.parametrize(
    "spec,num_tokens,depth,num_prefix",
    [(16, 197, 12, 1), ((16, -1), 50, 12, 1), (10, 17, 4, 1), ([9, 9, 9], 18, 3, 2), (5, 20, 4, 5), (30, 50, 3, 0)],
)
def test_clamping_is_data_and_matches_plain_rule(spec, num_tokens, depth, num_prefix):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # clamping is reported in the schedule, never as a warning
        schedule = resolve_schedule(spec, num_tokens, depth, num_prefix)
    requested = requested_r_per_layer(spec, depth)
    tokens = _clamped_tokens(requested, num_tokens, num_prefix)
    assert schedule.tokens == tuple(tokens)
    assert schedule.effective == tuple(a - b for a, b in zip(tokens[:-1], tokens[1:]))
    for i, (asked, got, n_in) in enumerate(zip(schedule.requested, schedule.effective, tokens)):
        assert got <= (n_in - num_prefix) // 2
        assert (i in schedule.clamped_layers) == (asked != got)
    assert schedule.clamped_layers  # at least one layer was clamped
    note = schedule.clamp_note()
    assert str(schedule.clamped_layers) in note and str(list(schedule.effective)) in note and "\n" not in note


def test_no_clamp_note_without_clamping():
    assert resolve_schedule(8, 197, 12, 1).clamp_note() == ""


def test_clamping_strict_raises():
    with pytest.raises(ScheduleError, match=r"clamped in layers \[11\].*--strict"):
        resolve_schedule(16, 197, 12, 1, strict=True)
    with pytest.raises(ScheduleError):
        resolve_schedule(9, 17, 2, 1, strict=True)  # (17 - 1) // 2 = 8 < 9
    resolve_schedule(8, 17, 1, 1, strict=True)  # exactly the maximum: fine


def test_clamp_never_merges_prefix_room():
    """With p prefix tokens at least p tokens (and never fewer than p + 1 when N > p) survive."""
    for num_prefix in range(0, 6):
        schedule = resolve_schedule(100, 37, 12, num_prefix)
        assert schedule.tokens[-1] == num_prefix + 1 or (schedule.tokens[-1] == num_prefix and 37 == num_prefix)
        assert all(t > num_prefix for t in schedule.tokens)


def test_schedule_dict_and_table():
    schedule = resolve_schedule((4, -1), 17, 4, 1)
    data = schedule.to_dict()
    assert data["r_requested"] == _ramp(4, -1, 4) == [8, 5, 2, 0]
    assert data["tokens_per_layer"] == _clamped_tokens([8, 5, 2, 0], 17, 1) == [17, 9, 5, 3, 3]
    assert data["r_effective"] == [8, 4, 2, 0]
    assert data["num_prefix_tokens"] == 1
    assert len(schedule.table().splitlines()) == 1 + 4
    assert "(clamped)" in schedule.table().splitlines()[2]


# ---------------------------------------------------------------------------------------------
# Theoretical speedup (docs/design.md#the-flop-rule)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,r,published", [(768, 16, 2.02), (768, 8, 1.34), (384, 16, 2.03), (384, 8, 1.35)])
def test_theoretical_speedup_anchors(dim, r, published):
    schedule = resolve_schedule(r, 197, 12, 1)  # r=16 clamps the last layer (21 tokens -> only 10 merge)
    tokens = _clamped_tokens([r] * 12, 197, 1)
    expected = _flops([197] * 13, dim) / _flops(tokens, dim)
    assert expected == pytest.approx(published, abs=0.005)  # our plain formula reproduces the published ratio
    assert flops.theoretical_speedup(schedule.tokens, dim) == pytest.approx(expected, rel=1e-12)


def test_speedup_is_one_without_merging_and_flops_formula():
    assert flops.theoretical_speedup([197] * 13, 768) == pytest.approx(1.0)
    tokens = [50, 40, 30]
    assert flops.transformer_flops(tokens, 64) == pytest.approx(_flops(tokens, 64))
    assert flops.block_flops(50, 40, 64) == pytest.approx(8 * 50 * 64**2 + 4 * 50**2 * 64 + 16 * 40 * 64**2)
