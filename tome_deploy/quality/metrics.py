"""How close a ToMe model's outputs stay to the plain model's, each with a 95% confidence interval.

Inputs are one row per image, in the same order for both models: logits [n, classes] or embeddings
[n, dim]. Proportions (agreement, accuracy) use the Wilson score interval; means of per-image values (KL,
cosine, the paired accuracy difference, kNN recall) use mean ± 1.96 · std / sqrt(n) with the sample
standard deviation (ddof=1), and low = high = value for one image. Pure numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from tome_deploy.errors import InvalidInputError

Z95 = 1.96  # two-sided 95% normal quantile
OUTPUT_KINDS = ("logits", "embedding")
LOGITS_METRICS = ("top1_agreement", "top5_agreement", "mean_kl", "accuracy", "reference_accuracy", "accuracy_drop")
LABEL_METRICS = ("accuracy", "reference_accuracy", "accuracy_drop")  # need labels
EMBEDDING_METRICS = ("cosine_mean", "cosine_p5", "knn_recall10")
_KNN_CHUNK = 512  # rows of the similarity matrix held at once


@dataclass(frozen=True)
class Estimate:
    """A metric's value and its 95% confidence interval [low, high], from `count` images."""

    value: float
    low: float
    high: float
    count: int


def wilson(successes: int, count: int) -> Estimate:
    """The share successes / count with its Wilson score interval (count >= 1)."""
    p = successes / count
    denominator = 1 + Z95**2 / count
    center = (p + Z95**2 / (2 * count)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / count + Z95**2 / (4 * count**2)) / denominator
    return Estimate(p, center - half, center + half, count)


def mean_estimate(values: np.ndarray) -> Estimate:
    """The mean of per-image values [n] with mean ± 1.96 · std(ddof=1) / sqrt(n); low = high for n == 1."""
    n = len(values)
    mean = float(np.mean(values))
    if n == 1:
        return Estimate(mean, mean, mean, 1)
    half = Z95 * float(np.std(values, ddof=1)) / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


def topk_agreement(reference: np.ndarray, candidate: np.ndarray, k: int) -> Estimate:
    """Share of rows whose reference top-1 class is among the candidate's k highest (k=1: same top-1);
    k above the number of classes counts every class. reference, candidate: [n, classes]."""
    _check_pair(reference, candidate)
    top1 = np.argmax(reference, axis=1)
    ranked = np.argsort(-candidate, axis=1, kind="stable")[:, :k]
    return wilson(int(np.sum(np.any(ranked == top1[:, None], axis=1))), len(reference))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - np.max(logits, axis=1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=1, keepdims=True))


def mean_kl(reference: np.ndarray, candidate: np.ndarray) -> Estimate:
    """Mean over rows of KL(softmax(reference) || softmax(candidate)) in nats. [n, classes] each."""
    _check_pair(reference, candidate)
    log_p, log_q = _log_softmax(reference), _log_softmax(candidate)
    return mean_estimate(np.sum(np.exp(log_p) * (log_p - log_q), axis=1))


def _correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1.0 where the top-1 class of a row [n, classes] is its label [n], else 0.0."""
    if len(labels) != len(logits):
        raise InvalidInputError(f"{len(labels)} labels for {len(logits)} rows of logits; give one label per row")
    return (np.argmax(logits, axis=1) == np.asarray(labels)).astype(np.float64)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> Estimate:
    """Top-1 accuracy as a fraction, Wilson interval. logits [n, classes], labels [n]."""
    _check_rows(logits)
    return wilson(int(np.sum(_correct(logits, labels))), len(logits))


def accuracy_drop_points(reference_logits: np.ndarray, candidate_logits: np.ndarray, labels: np.ndarray) -> Estimate:
    """100 · (accuracy of reference - accuracy of candidate), in points, with the interval of the mean of the
    paired per-image differences 100 · (correct_ref - correct_cand) in {-100, 0, 100}."""
    _check_pair(reference_logits, candidate_logits)
    return mean_estimate(100.0 * (_correct(reference_logits, labels) - _correct(candidate_logits, labels)))


def _cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity [n] of [n, dim] arrays; a zero row has cosine 0 with anything."""
    a, b = reference.astype(np.float64), candidate.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.where(norms > 0, norms, 1.0)


def cosine_similarity(reference: np.ndarray, candidate: np.ndarray) -> tuple[Estimate, float]:
    """(mean row-wise cosine with its interval, np.percentile of the cosines at 5). [n, dim] each."""
    _check_pair(reference, candidate)
    cosines = _cosines(reference, candidate)
    return mean_estimate(cosines), float(np.percentile(cosines, 5))


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    """[n, k] indices of each row's k most cosine-similar other rows (ties: lower index first)."""
    unit = _unit_rows(x)
    found = np.empty((len(x), k), dtype=np.int64)
    for start in range(0, len(x), _KNN_CHUNK):
        similarity = unit[start : start + _KNN_CHUNK] @ unit.T
        rows = np.arange(len(similarity))
        similarity[rows, start + rows] = -np.inf  # a row is not its own neighbour
        found[start : start + len(similarity)] = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    return found


def knn_recall(reference: np.ndarray, candidate: np.ndarray, k: int = 10) -> Estimate:
    """Mean over rows of |N_ref(i) ∩ N_cand(i)| / k', where N(i) are row i's k' = min(k, n - 1) nearest other
    rows by cosine similarity under each model. [n, dim] each, n >= 2."""
    _check_pair(reference, candidate)
    if len(reference) < 2:
        raise InvalidInputError("kNN recall needs at least 2 images; add images")
    k = min(k, len(reference) - 1)
    expected, found = _neighbours(reference, k), _neighbours(candidate, k)
    hits = np.array([len(np.intersect1d(e, f)) for e, f in zip(expected, found)], dtype=np.float64)
    return mean_estimate(hits / k)


def quality_metrics(
    kind: str, reference: np.ndarray, candidate: np.ndarray, labels: Optional[np.ndarray]
) -> dict[str, Estimate]:
    """Every metric of `kind` (OUTPUT_KINDS). logits: top1_agreement, top5_agreement, mean_kl, and with
    labels accuracy (the candidate's), reference_accuracy and accuracy_drop (points); embedding:
    cosine_mean, cosine_p5 (low = high = value) and knn_recall10 (labels unused)."""
    _check_pair(reference, candidate)
    if kind == "logits":
        metrics = {
            "top1_agreement": topk_agreement(reference, candidate, 1),
            "top5_agreement": topk_agreement(reference, candidate, 5),
            "mean_kl": mean_kl(reference, candidate),
        }
        if labels is not None:
            metrics["accuracy"] = accuracy(candidate, labels)
            metrics["reference_accuracy"] = accuracy(reference, labels)
            metrics["accuracy_drop"] = accuracy_drop_points(reference, candidate, labels)
        return metrics
    if kind == "embedding":
        mean, p5 = cosine_similarity(reference, candidate)
        return {
            "cosine_mean": mean,
            "cosine_p5": Estimate(p5, p5, p5, len(reference)),
            "knn_recall10": knn_recall(reference, candidate, 10),
        }
    raise InvalidInputError(f"unknown output kind {kind!r}; choose one of {', '.join(OUTPUT_KINDS)}")


def _check_rows(x: np.ndarray) -> None:
    if x.ndim != 2 or len(x) == 0:
        raise InvalidInputError(
            f"quality metrics need one output row per image, [n >= 1, width], got shape {list(x.shape)}; "
            "pass images that decode"
        )


def _check_pair(reference: np.ndarray, candidate: np.ndarray) -> None:
    _check_rows(reference)
    if reference.shape != candidate.shape:
        raise InvalidInputError(
            f"the reference outputs {list(reference.shape)} and candidate outputs {list(candidate.shape)} differ "
            "in shape; compare the same images through models with the same output"
        )
