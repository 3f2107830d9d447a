"""Exports stay numerically what they were: the timm ViT as the 0.1.0 release (commit 8a3ba33) exported it,
the other families as commit ecbc733 did.

tests/data/golden_logits.npz holds the ONNX Runtime logits of that release's exports, made once with its
own code (random weights, seed 0; inputs: numpy default_rng(0) normal, batch 3, opset 18, dynamic batch).
The same export made by the current code must give the same logits: a refactor, a model adapter or a
cheaper graph may change node names, never the numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from family_sources import FAMILY_SOURCES

from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner

GOLDEN = Path(__file__).parents[1] / "data" / "golden_logits.npz"

CASES = [
    ("test_vit", 4, "scatter"),
    ("test_vit", 4, "matmul"),
    pytest.param("vit_small_patch16_224", 16, "scatter", marks=pytest.mark.slow),
    pytest.param("vit_small_patch16_224", 16, "matmul", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("model, r, merge", CASES)
def test_export_matches_the_release_numerically(release_export, model, r, merge):
    golden = np.load(GOLDEN)[f"{model}_r{r}_{merge}"]
    outcome = release_export(model, r, merge)  # export_model(ModelSource(model, seed=0), ...), tests/conftest.py
    input_size = outcome.export.metadata.input.shape
    pixels = np.random.default_rng(0).standard_normal((3, *input_size)).astype(np.float32)
    with OnnxRuntimeRunner(outcome.export.path) as runner:
        logits = runner.infer({"pixel_values": pixels})["logits"]
    assert logits.shape == golden.shape
    assert np.abs(logits - golden).max() <= 1e-5, f"max abs difference {np.abs(logits - golden).max():.3g}"


# One model per family besides the timm ViT, each through its own source form (tests/family_sources.py).
# tests/data/golden_family_logits.npz holds the ONNX Runtime logits of these exports made once at commit
# ecbc733 (before model sources, formulations and runners became registries), same inputs as above.
FAMILY_GOLDEN = Path(__file__).parents[1] / "data" / "golden_family_logits.npz"


@pytest.mark.parametrize("family", sorted(FAMILY_SOURCES))
def test_every_family_exports_what_it_exported_before(family, tmp_path):
    from tome_deploy.jobs.export import export_model

    make_source, r = FAMILY_SOURCES[family]
    golden = np.load(FAMILY_GOLDEN)[f"{family}_r{r}_scatter"]
    outcome = export_model(
        make_source(tmp_path / "source"), tmp_path / f"{family}.onnx", r=r, merge="scatter", validate=False
    )
    input_size = outcome.export.metadata.input.shape
    pixels = np.random.default_rng(0).standard_normal((3, *input_size)).astype(np.float32)
    with OnnxRuntimeRunner(outcome.export.path) as runner:
        (logits,) = runner.infer({"pixel_values": pixels}).values()
    assert logits.shape == golden.shape
    assert np.abs(logits - golden).max() <= 1e-5, f"max abs difference {np.abs(logits - golden).max():.3g}"
