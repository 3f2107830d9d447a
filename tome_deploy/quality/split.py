"""A seeded split of a set of images into calibration images (what a search may look at) and held-out images
(what its result is judged on)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from tome_deploy.errors import InvalidInputError


def split_indices(
    count: int, labels: Optional[Sequence[int]], *, held_out_fraction: float = 0.5, seed: int = 0
) -> tuple[list[int], list[int]]:
    """(calibration, held_out): disjoint sorted lists that together hold range(count), both non-empty.

    With labels (one per index), each class is split on its own (stratified): a class of n images puts
    round(n * held_out_fraction) of them, clamped to [1, n - 1] when n >= 2, in held_out; a class of one
    image goes to calibration. Without labels the same rule applies to all the images as one class.
    The same (count, labels, fraction, seed) always gives the same split. InvalidInputError when
    count < 2, when the fraction is not strictly between 0 and 1, or when labels has another length."""
    if count < 2:
        raise InvalidInputError(
            f"splitting needs at least 2 images (one to calibrate on, one held out), got {count}; add images"
        )
    if not 0.0 < held_out_fraction < 1.0:
        raise InvalidInputError(f"the held-out fraction must be between 0 and 1 (exclusive), got {held_out_fraction}")
    if labels is not None and len(labels) != count:
        raise InvalidInputError(f"{len(labels)} labels for {count} images; give one label per image")
    groups = [0] * count if labels is None else [int(label) for label in labels]
    rng = np.random.default_rng(seed)
    held_out: list[int] = []
    for group in sorted(set(groups)):
        members = [index for index, value in enumerate(groups) if value == group]
        if len(members) < 2:
            continue
        take = min(max(round(len(members) * held_out_fraction), 1), len(members) - 1)
        held_out += [members[i] for i in rng.permutation(len(members))[:take]]
    if not held_out:  # every class has one image: hold out one image at random, keep the rest
        held_out = [int(rng.integers(count))]
    chosen = set(held_out)
    return [index for index in range(count) if index not in chosen], sorted(held_out)
