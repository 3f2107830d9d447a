"""split_indices: disjoint, complete, seeded, stratified."""

from __future__ import annotations

import pytest

from tome_deploy.errors import InvalidInputError
from tome_deploy.quality.split import split_indices

LABELS = [0] * 6 + [1] * 4 + [2] * 2 + [3]  # class 3 has one image


def test_disjoint_and_covering_and_sorted():
    calibration, held_out = split_indices(len(LABELS), LABELS, seed=3)
    assert not set(calibration) & set(held_out)
    assert sorted(calibration + held_out) == list(range(len(LABELS)))
    assert calibration == sorted(calibration) and held_out == sorted(held_out)


def test_same_seed_same_split_other_seed_other_split():
    assert split_indices(100, None, seed=1) == split_indices(100, None, seed=1)
    assert split_indices(100, None, seed=1) != split_indices(100, None, seed=2)


def test_stratified_by_label():
    calibration, held_out = split_indices(len(LABELS), LABELS, held_out_fraction=0.5, seed=0)
    for label, size in [(0, 6), (1, 4), (2, 2)]:
        assert sum(LABELS[i] == label for i in held_out) == size // 2
        assert sum(LABELS[i] == label for i in calibration) == size - size // 2
    assert 12 in calibration  # the only image of class 3 is calibrated on


def test_fraction_without_labels():
    calibration, held_out = split_indices(10, None, held_out_fraction=0.3)
    assert (len(calibration), len(held_out)) == (7, 3)
    calibration, held_out = split_indices(2, None, held_out_fraction=0.01)
    assert (len(calibration), len(held_out)) == (1, 1)  # both parts stay non-empty


@pytest.mark.parametrize(
    "count, labels, fraction, message",
    [(1, None, 0.5, "at least 2 images"), (4, None, 1.0, "between 0 and 1"), (4, [0, 1], 0.5, "2 labels for 4")],
)
def test_refusals(count, labels, fraction, message):
    with pytest.raises(InvalidInputError, match=message):
        split_indices(count, labels, held_out_fraction=fraction)
