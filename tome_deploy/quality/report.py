"""Running a plain and a ToMe runner over an ImageSet, and the quality report of the outcome."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

from tome_deploy.errors import InvalidInputError
from tome_deploy.quality.budget import Budget
from tome_deploy.quality.data import DataConfig, ImageSet, check_decoded
from tome_deploy.quality.metrics import EMBEDDING_METRICS, LABEL_METRICS, Estimate
from tome_deploy.runtime.base import Runner


def paired_outputs(
    reference: Runner,
    candidate: Runner,
    images: ImageSet,
    indices: Sequence[int],
    config: DataConfig,
    *,
    input_name: str,
    output_name: str,
    batch_size: int,
    fixed_batch: bool,
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Both active runners on the same decoded images, `batch_size` at a time -> (reference outputs [n, ...],
    candidate outputs [n, ...], the n indices that decoded). A fixed-batch model gets a short last batch
    padded with copies of its last image (their outputs dropped). InvalidInputError when nothing decodes."""
    outputs: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    decoded: list[int] = []
    for start in range(0, len(indices), batch_size):
        pixels, ok = images.pixels(indices[start : start + batch_size], config)
        if not ok:
            continue
        feed = pixels
        if fixed_batch and len(pixels) < batch_size:
            feed = np.concatenate([pixels, np.repeat(pixels[-1:], batch_size - len(pixels), axis=0)])
        for runner, kept in zip((reference, candidate), outputs):
            kept.append(np.asarray(runner.infer({input_name: feed})[output_name])[: len(pixels)])
        decoded += ok
    check_decoded(images, len(decoded))
    return np.concatenate(outputs[0]), np.concatenate(outputs[1]), decoded


def output_kind(output_name: str, shape: Sequence[int], metric: Optional[str]) -> str:
    """ "logits" for an output named "logits" of shape [n, classes > 1], else "embedding"; a --metric that
    names an embedding metric makes it "embedding". InvalidInputError for a logits metric on an embedding."""
    looks_like_logits = output_name == "logits" and len(shape) == 2 and shape[1] > 1
    if metric in EMBEDDING_METRICS or not looks_like_logits:
        if metric is not None and metric not in EMBEDDING_METRICS:
            raise InvalidInputError(
                f"--metric {metric} needs classification logits but the model's output {output_name} "
                f"{list(shape)} is an embedding; use one of {', '.join(EMBEDDING_METRICS)}"
            )
        return "embedding"
    return "logits"


def headline_metric(kind: str, has_labels: bool, metric: Optional[str]) -> str:
    """The metric a run is summed up by: --metric when given (refused when it needs labels the data lacks),
    else accuracy_drop (labelled logits), top1_agreement (unlabelled logits) or cosine_mean (embeddings)."""
    if metric is not None:
        if metric in LABEL_METRICS and not has_labels:
            raise InvalidInputError(
                f"--metric {metric} needs labelled images; lay out --data as root/<class>/<image> or use top1_agreement"
            )
        return metric
    if kind == "embedding":
        return "cosine_mean"
    return "accuracy_drop" if has_labels else "top1_agreement"


@dataclass(frozen=True)
class QualityReport:
    """What `tome-validate --data` found: the candidate's quality against the plain model on every image."""

    artifact: str
    data: str
    fingerprint: str
    images: int  # image files found
    unreadable: int  # of them, those that did not decode
    kind: str  # an OUTPUT_KINDS entry
    metric: str  # the headline metric
    metrics: dict[str, Estimate]
    budget: Budget

    @property
    def violations(self) -> list[str]:
        return self.budget.violations({name: e.value for name, e in self.metrics.items()})

    def table(self) -> str:
        """One line per metric: value, 95% interval and image count; the headline metric marked with *."""
        lines = [f"{'metric':<20} {'value':>10}  {'95% interval':<24} images"]
        for name, e in self.metrics.items():
            label = f"{name}{' *' if name == self.metric else ''}"
            interval = f"[{e.low:.4f}, {e.high:.4f}]"
            lines.append(f"{label:<20} {e.value:>10.4f}  {interval:<24} {e.count}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "artifact": self.artifact,
            "data": {
                "path": self.data,
                "fingerprint": self.fingerprint,
                "images": self.images,
                "unreadable": self.unreadable,
            },
            "output_kind": self.kind,
            "metric": self.metric,
            "budget": asdict(self.budget),
            "within_budget": not self.violations,
            "metrics": {name: asdict(e) for name, e in self.metrics.items()},
        }
