"""The quality metrics against values worked out by hand for a few rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pytest import approx

from tome_deploy.errors import InvalidInputError
from tome_deploy.quality.metrics import (
    Estimate,
    accuracy,
    accuracy_drop_points,
    cosine_similarity,
    knn_recall,
    mean_kl,
    quality_metrics,
    topk_agreement,
)

# top-1 classes: reference 0, 1, 2; candidate 1, 1, 2. The candidate's top-2 of row 0 is {1, 0}.
REFERENCE = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0]])
CANDIDATE = np.array([[1.0, 2.0, 0.0], [0.0, 3.0, 1.0], [0.0, 1.0, 2.0]])
# Wilson 95% interval of 2 successes in 3: p = 2/3, z^2 = 3.8416, centre (p + z^2/6) / (1 + z^2/3) = 0.573079,
# half-width 1.96 * sqrt(p(1-p)/3 + z^2/36) / (1 + z^2/3) = 0.365428.
TWO_OF_THREE = Estimate(2 / 3, 0.207655, 0.938510, 3)


def assert_estimate(got: Estimate, expected: Estimate) -> None:
    assert got.count == expected.count
    assert (got.value, got.low, got.high) == approx((expected.value, expected.low, expected.high), abs=1e-5)


def test_top1_and_topk_agreement():
    assert_estimate(topk_agreement(REFERENCE, CANDIDATE, 1), TWO_OF_THREE)
    # all three agree within the top 2; Wilson of 3 in 3: [1 / (1 + z^2/3), 1] = [0.438494, 1]
    assert_estimate(topk_agreement(REFERENCE, CANDIDATE, 2), Estimate(1.0, 0.438494, 1.0, 3))
    assert topk_agreement(REFERENCE, CANDIDATE, 5).value == 1.0  # k above the class count: every class


def test_mean_kl():
    # row 0: p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.143841; row 1: KL 0.
    # mean 0.071921; std (ddof 1) = 0.143841 / sqrt 2, so half-width 1.96 * 0.143841 / 2 = 0.140964
    reference = np.array([[0.0, 0.0], [5.0, 1.0]])
    candidate = np.array([[0.0, math.log(3.0)], [5.0, 1.0]])
    assert_estimate(mean_kl(reference, candidate), Estimate(0.071921, 0.071921 - 0.140964, 0.071921 + 0.140964, 2))
    # one row: the interval is the value
    assert_estimate(mean_kl(reference[:1], candidate[:1]), Estimate(0.143841, 0.143841, 0.143841, 1))


def test_accuracy():
    assert_estimate(accuracy(REFERENCE, np.array([0, 1, 1])), TWO_OF_THREE)


def test_accuracy_drop_is_a_paired_difference_in_points():
    labels = np.array([0, 1, 2])
    # reference correct (1, 1, 1), candidate correct (0, 1, 1): differences 100, 0, 0 -> mean 33.333,
    # std (ddof 1) 100 / sqrt 3, half-width 1.96 * (100 / sqrt 3) / sqrt 3 = 65.333
    assert_estimate(
        accuracy_drop_points(REFERENCE, CANDIDATE, labels),
        Estimate(100 / 3, 100 / 3 - 65.333333, 100 / 3 + 65.333333, 3),
    )
    # add a row the candidate gets and the reference misses: 100, 0, 0, -100 -> mean 0,
    # std sqrt((100^2 + 100^2) / 3) = 81.6497, half-width 1.96 * 81.6497 / 2 = 80.016665
    reference = np.vstack([REFERENCE, [[1.0, 0.0, 0.0]]])
    candidate = np.vstack([CANDIDATE, [[0.0, 0.0, 1.0]]])
    got = accuracy_drop_points(reference, candidate, np.array([0, 1, 2, 2]))
    assert_estimate(got, Estimate(0.0, -80.016665, 80.016665, 4))


def test_cosine_similarity_and_its_5th_percentile():
    reference = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    candidate = np.array([[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    # cosines 1, 0, 1/sqrt 2: mean 0.569036, std (ddof 1) 0.514099, half-width 1.96 * 0.514099 / sqrt 3 = 0.581758;
    # 5th percentile (linear): 0 + 0.1 * (0.707107 - 0) = 0.070711
    mean, p5 = cosine_similarity(reference, candidate)
    assert_estimate(mean, Estimate(0.569036, 0.569036 - 0.581758, 0.569036 + 0.581758, 3))
    assert p5 == approx(0.070711, abs=1e-6)
    zero_row, _ = cosine_similarity(np.array([[0.0, 0.0]]), np.array([[1.0, 0.0]]))
    assert zero_row.value == 0.0


def test_knn_recall_excludes_the_row_itself():
    # Under the reference the nearest other row of a, b, c, d is b, a, d, c. The candidate moves d to
    # (1, -0.2): a -> b (0.995 vs 0.981) and b -> a still, but c -> b and d -> a. Recalls 1, 1, 0, 0:
    # mean 0.5, std (ddof 1) sqrt(1/3), half-width 1.96 * 0.57735 / 2 = 0.565803
    reference = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    candidate = np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [1.0, -0.2]])
    assert_estimate(knn_recall(reference, candidate, k=1), Estimate(0.5, 0.5 - 0.565803, 0.5 + 0.565803, 4))
    # k = 10 on 3 rows looks at the 2 other rows, which are every row: recall 1
    assert_estimate(knn_recall(reference[:3], candidate[:3]), Estimate(1.0, 1.0, 1.0, 3))


def test_quality_metrics_by_kind():
    logits = quality_metrics("logits", REFERENCE, CANDIDATE, np.array([0, 1, 2]))
    assert list(logits) == [
        "top1_agreement",
        "top5_agreement",
        "mean_kl",
        "accuracy",
        "reference_accuracy",
        "accuracy_drop",
    ]
    assert logits["accuracy"].value == approx(2 / 3) and logits["reference_accuracy"].value == 1.0
    assert logits["accuracy_drop"].value == approx(100 / 3)
    assert set(quality_metrics("logits", REFERENCE, CANDIDATE, None)) == {"top1_agreement", "top5_agreement", "mean_kl"}
    embedding = quality_metrics("embedding", REFERENCE, REFERENCE, None)
    assert list(embedding) == ["cosine_mean", "cosine_p5", "knn_recall10"]
    assert embedding["cosine_p5"] == Estimate(approx(1.0), approx(1.0), approx(1.0), 3)
    assert embedding["knn_recall10"].value == 1.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: quality_metrics("probabilities", REFERENCE, CANDIDATE, None), "unknown output kind"),
        (lambda: quality_metrics("logits", REFERENCE[:0], CANDIDATE[:0], None), "one output row per image"),
        (lambda: topk_agreement(REFERENCE, CANDIDATE[:2], 1), "differ in shape"),
        (lambda: accuracy(REFERENCE, np.array([0, 1])), "2 labels for 3 rows"),
        (lambda: knn_recall(REFERENCE[:1], CANDIDATE[:1]), "at least 2 images"),
    ],
)
def test_refusals(call, message):
    with pytest.raises(InvalidInputError, match=message):
        call()
