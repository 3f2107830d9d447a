"""Budget: which bounds apply, whether point values meet them, and how they read."""

from __future__ import annotations

import pytest

from tome_deploy.errors import InvalidInputError
from tome_deploy.quality.budget import Budget


def test_within_and_violations():
    budget = Budget(max_drop=1.0, min_agreement=0.95)
    assert budget.within({"accuracy_drop": 1.0, "top1_agreement": 0.95})  # bounds are inclusive
    assert not budget.within({"accuracy_drop": 1.5, "top1_agreement": 0.99})
    assert budget.violations({"accuracy_drop": 0.5, "top1_agreement": 0.9}) == [
        "top1_agreement 0.9 is below the bound --min-agreement 0.95"
    ]
    assert Budget(min_cosine=0.99).violations({"cosine_mean": 0.98}) == [
        "cosine_mean 0.98 is below the bound --min-cosine 0.99"
    ]
    assert Budget().within({})


def test_bounded_metrics():
    assert Budget().bounded_metrics() == []
    assert Budget(max_drop=1.0).bounded_metrics() == ["accuracy_drop"]
    assert Budget(min_agreement=0.9, min_cosine=0.5).bounded_metrics() == ["top1_agreement", "cosine_mean"]


def test_describe():
    assert Budget(max_drop=1.0).describe() == "accuracy drop <= 1 point"
    assert (
        Budget(max_drop=0.5, min_agreement=0.99).describe() == "accuracy drop <= 0.5 points and top-1 agreement >= 0.99"
    )
    assert Budget(min_cosine=0.98).describe() == "mean cosine >= 0.98"
    assert Budget().describe() == "no bound"


def test_check_accepts_bounds_that_apply():
    Budget(max_drop=1.0, min_agreement=0.9).check("logits", has_labels=True)
    Budget(min_agreement=0.9).check("logits", has_labels=False)
    Budget(min_cosine=0.9).check("embedding", has_labels=False)


@pytest.mark.parametrize(
    "budget, kind, has_labels, message",
    [
        (Budget(max_drop=1.0), "logits", False, "--max-drop needs labelled images"),
        (Budget(min_cosine=0.9), "logits", True, "--min-cosine bounds embedding outputs"),
        (Budget(min_agreement=0.9), "embedding", False, "--min-agreement bounds logits outputs.*use --min-cosine"),
        (Budget(max_drop=float("nan")), "logits", True, "finite"),
    ],
)
def test_check_refuses_bounds_that_do_not_apply(budget, kind, has_labels, message):
    with pytest.raises(InvalidInputError, match=message):
        budget.check(kind, has_labels)
