"""The quality a ToMe model must keep: bounds on accuracy drop, top-1 agreement or cosine similarity."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

from tome_deploy.errors import InvalidInputError

# bound -> (the metric it bounds, the output kind it applies to, its flag, how it reads)
_BOUNDS = {
    "max_drop": ("accuracy_drop", "logits", "--max-drop", "accuracy drop <= {} point{}"),
    "min_agreement": ("top1_agreement", "logits", "--min-agreement", "top-1 agreement >= {}"),
    "min_cosine": ("cosine_mean", "embedding", "--min-cosine", "mean cosine >= {}"),
}


@dataclass(frozen=True)
class Budget:
    """Bounds a model's held-out quality must meet; None: no bound. All set bounds must hold."""

    max_drop: Optional[float] = None  # points of accuracy (needs labels)
    min_agreement: Optional[float] = None  # top1_agreement (logits)
    min_cosine: Optional[float] = None  # cosine_mean (embeddings)

    def _set(self) -> dict[str, float]:
        return {name: value for name in _BOUNDS if (value := getattr(self, name)) is not None}

    def check(self, kind: str, has_labels: bool) -> None:
        """InvalidInputError for a bound that is not a finite number or does not apply to the output kind
        (or, for --max-drop, to data without labels)."""
        for name, value in self._set().items():
            _, applies_to, flag, _ = _BOUNDS[name]
            if not math.isfinite(value):
                raise InvalidInputError(f"{flag} must be a finite number, got {value}")
            if kind != applies_to:
                raise InvalidInputError(
                    f"{flag} bounds {applies_to} outputs but the model's output is {kind}; "
                    f"use {' or '.join(f for _, k, f, _ in _BOUNDS.values() if k == kind)} instead"
                )
            if name == "max_drop" and not has_labels:
                raise InvalidInputError(
                    "--max-drop needs labelled images; lay out the data as root/<class>/<image> or use --min-agreement"
                )

    def violations(self, metrics: Mapping[str, float]) -> list[str]:
        """One line per bound the point values in `metrics` break, naming the metric, its value and the bound."""
        broken = []
        for name, bound in self._set().items():
            metric = _BOUNDS[name][0]
            value = metrics[metric]
            if (value > bound) if name == "max_drop" else (value < bound):
                relation = "above the bound" if name == "max_drop" else "below the bound"
                broken.append(f"{metric} {value:.4g} is {relation} {_BOUNDS[name][2]} {bound:g}")
        return broken

    def within(self, metrics: Mapping[str, float]) -> bool:
        """Whether every set bound holds on the point values in `metrics` (metric name -> value)."""
        return not self.violations(metrics)

    def bounded_metrics(self) -> list[str]:
        """The metrics the set bounds apply to, e.g. ["accuracy_drop"] for --max-drop."""
        return [_BOUNDS[name][0] for name in self._set()]

    def describe(self) -> str:
        """The bounds in words, e.g. "accuracy drop <= 1 point"; "no bound" when none is set."""
        parts = []
        for name, value in self._set().items():
            text = _BOUNDS[name][3]
            parts.append(
                text.format(f"{value:g}", "" if value == 1 else "s")
                if name == "max_drop"
                else text.format(f"{value:g}")
            )
        return " and ".join(parts) or "no bound"
