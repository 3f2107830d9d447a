"""Output comparison: one verdict per output; NaN or Inf anywhere always fails."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np

from tome_deploy.errors import InvalidInputError


def check_tolerances(atol: Optional[float], rtol: Optional[float]) -> None:
    """InvalidInputError (exit 2) for a parity tolerance that is NaN, infinite or negative: with NaN every
    comparison is false and with a negative one nothing can pass, so such a run could only end in a "parity
    failed" that says nothing about the export. None: the precision's default."""
    for flag, value in (("--atol", atol), ("--rtol", rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise InvalidInputError(
                f"{flag} is {value}; pass a finite number >= 0 (0 asks for exact equality), or drop it for the default"
            )


@dataclass(frozen=True)
class OutputVerdict:
    probe: str  # which input set
    batch: int
    output: str
    max_abs: float
    max_rel: float
    cosine: float
    top1_agreement: float  # share of rows whose argmax matches
    top5_agreement: float  # share of rows whose top-5 sets match
    passed: bool
    reason: str
    runner: str = ""  # the candidate compared with the reference
    merge_agreement: Optional[float] = None  # share of blocks x images with fp32's merges (reduced precision)

    def to_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        merges = "" if self.merge_agreement is None else f" {self.merge_agreement:>7.1%}"
        return (
            f"{self.probe:<9} {self.batch:>5}  {self.output:<8} {self.max_abs:>10.3g} {self.max_rel:>10.3g} "
            f"{self.cosine:>10.7f} {self.top1_agreement:>6.0%} {self.top5_agreement:>6.0%}{merges}  {verdict} {self.reason}"
        )


VERDICT_HEADER = f"{'probe':<9} {'batch':>5}  {'output':<8} {'max_abs':>10} {'max_rel':>10} {'cosine':>10} {'top1':>6} {'top5':>6}  verdict"
AGREEMENT_HEADER = VERDICT_HEADER.replace("  verdict", f" {'merges':>7}  verdict")


def _top_k_sets(logits: np.ndarray, k: int) -> list[frozenset]:
    k = min(k, logits.shape[-1])
    return [frozenset(row) for row in np.argsort(-logits, axis=-1, kind="stable")[:, :k]]


def compare_output(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    probe: str,
    output: str,
    atol: float,
    rtol: float,
    min_cosine: float,
) -> OutputVerdict:
    batch = int(reference.shape[0]) if reference.ndim else 1
    if reference.shape != candidate.shape:
        return OutputVerdict(
            probe, batch, output, np.inf, np.inf, 0.0, 0.0, 0.0, False, f"shape {candidate.shape} != {reference.shape}"
        )
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    finite = bool(np.isfinite(ref).all() and np.isfinite(cand).all())
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(ref - cand)
        max_abs = float(np.nanmax(diff)) if finite else float("nan")
        max_rel = float(np.nanmax(diff / np.maximum(np.abs(ref), 1e-12))) if finite else float("nan")
        norm = np.linalg.norm(ref) * np.linalg.norm(cand)
        cosine = (
            float(np.sum(ref * cand) / norm)
            if finite and norm > 0
            else (1.0 if finite and not diff.any() else float("nan"))
        )
    rows_ref = ref.reshape(batch, -1)
    rows_cand = cand.reshape(batch, -1)
    top1 = float(np.mean(rows_ref.argmax(-1) == rows_cand.argmax(-1)))
    top5 = float(np.mean([a == b for a, b in zip(_top_k_sets(rows_ref, 5), _top_k_sets(rows_cand, 5))]))
    if not finite:
        return OutputVerdict(probe, batch, output, max_abs, max_rel, cosine, top1, top5, False, "non-finite values")
    within = bool(np.all(diff <= atol + rtol * np.abs(ref)))
    reasons = [] if within else [f"|diff| > {atol:g} + {rtol:g}*|ref|"]
    if not cosine >= min_cosine:
        reasons.append(f"cosine < {min_cosine}")
    return OutputVerdict(probe, batch, output, max_abs, max_rel, cosine, top1, top5, not reasons, "; ".join(reasons))


def judge_agreement(
    verdict: OutputVerdict, merge_agreement: float, min_cosine: float, min_merges: float
) -> OutputVerdict:
    """A reduced-precision verdict: the comparison's numbers and `merge_agreement`, passed when its values are
    finite, its cosine >= min_cosine and its merge agreement >= min_merges (atol/rtol do not apply)."""
    reasons = []
    if verdict.reason in ("non-finite values",) or verdict.reason.startswith("shape "):
        reasons.append(verdict.reason)
    if not verdict.cosine >= min_cosine:
        reasons.append(f"cosine < {min_cosine}")
    if not merge_agreement >= min_merges:
        reasons.append(f"merge agreement < {min_merges:.0%}")
    return replace(verdict, merge_agreement=merge_agreement, passed=not reasons, reason="; ".join(reasons))
