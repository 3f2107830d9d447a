"""The trained digits ViT: reproducible training, the committed weights, and what ToMe costs in accuracy."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tome_deploy.errors import MissingDependencyError
from tome_deploy.models import digits
from tome_deploy.models.digits import (
    ARCH,
    ASSET_DATA,
    ASSET_JSON,
    ASSET_WEIGHTS,
    digits_test_set,
    digits_train_set,
    evaluate,
    load_digits_vit,
    pixels_from_digits,
    recorded_accuracy,
)
from tome_deploy.models.digits_training import TrainConfig, build_model, digits_data_from_sklearn, train
from tome_deploy.models.loading.dispatch import load_model
from tome_deploy.models.loading.fingerprint import weights_fingerprint
from tome_deploy.models.patch import apply_tome
from tome_deploy.models.timm_vit import input_spec
from tome_deploy.preprocess import eval_transform

# A moderate constant r for this model (65 tokens, depth 6; the largest unclamped r is 9): 47 tokens out.
MODERATE_R = 3
# Short-form runs on a subset of the training split (small batches: from scratch, a ViT needs steps).
SHORT = TrainConfig(epochs=20, train_limit=240, batch_size=16, max_shift=0, weight_decay=0.0)
TINY = dataclasses.replace(SHORT, epochs=3)
REPO_ROOT = Path(__file__).resolve().parents[2]
# A sitecustomize that makes scikit-learn (and SciPy, which comes with it) unimportable, as in a core install.
WITHOUT_SCIKIT_LEARN = (
    "import sys\nsys.modules.update(sklearn=None, scipy=None)  # importing either raises ImportError\n"
)


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads(ASSET_JSON.read_text())


@pytest.fixture(scope="module")
def trained():
    return load_digits_vit()


@pytest.fixture(scope="module")
def test_set():
    return digits_test_set()


def test_split_is_fixed_and_stratified(record):
    train_images, train_labels = digits_train_set()
    test_pixels, test_labels = digits_test_set()
    assert train_images.shape == (1437, 8, 8) and test_pixels.shape == (360, 3, 32, 32)
    train_counts = np.bincount(train_labels.numpy(), minlength=10)
    test_counts = np.bincount(test_labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * (train_counts + test_counts)) <= 1)  # stratified 80/20
    assert record["split"]["test_indices_sha256"] == digits.split_fingerprint()


def test_shipped_data_is_what_scikit_learn_derives():
    """tome_deploy/assets/digits.npz holds load_digits() and the train_test_split indices, exactly."""
    pytest.importorskip("sklearn", reason="the digits extra (scikit-learn) derives the data")
    shipped, derived = digits.digits_data(ASSET_DATA), digits_data_from_sklearn()
    assert sorted(shipped) == sorted(derived) == ["images", "labels", "test_indices", "train_indices"]
    for name, array in derived.items():
        assert shipped[name].dtype == array.dtype and np.array_equal(shipped[name], array), name
    assert shipped["images"].shape == (1797, 8, 8) and shipped["images"].max() == 16


def test_deriving_the_data_without_scikit_learn_names_the_extra(monkeypatch):
    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"tome-deploy\[digits\]"):
        digits_data_from_sklearn()


@pytest.mark.slow
def test_export_and_validate_need_no_scikit_learn(tmp_path):
    """The core install's path: tome-export of the embedded digits model (committed weights, validated on
    random, constant and natural probes) and tome-validate of its file, with scikit-learn unimportable."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(WITHOUT_SCIKIT_LEARN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO_ROOT)]))
    blocked = subprocess.run([sys.executable, "-c", "import sklearn"], env=env, capture_output=True, text=True)
    assert blocked.returncode == 1 and "ModuleNotFoundError" in blocked.stderr  # the block is in force
    onnx = tmp_path / "digits.onnx"
    for command in (
        ["tome_deploy.cli.export", ARCH, "--r", str(MODERATE_R), "-o", str(onnx)],
        ["tome_deploy.cli.validate", ARCH, str(onnx)],
    ):
        result = subprocess.run([sys.executable, "-m", *command], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert "natural" in result.stderr and "PASS" in result.stderr, result.stderr


def test_pixels_match_the_exported_input_spec(trained):
    """The exporter's input spec (nearest resize, crop_pct 1.0, mean/std) reproduces our preprocessing."""
    images, _ = digits_train_set()
    spec = input_spec(trained)
    config = spec.preprocessing
    assert spec.shape == (3, 32, 32) and config["crop_pct"] == 1.0
    assert config["interpolation"] == "nearest"
    pixels = pixels_from_digits(images[:16])
    for image, expected in zip(images[:16], pixels):
        grey = Image.fromarray(np.round(image.numpy() * 255 / 16).astype(np.uint8))
        got = eval_transform(
            grey, spec.shape, config["mean"], config["std"], config["crop_pct"], config["interpolation"]
        )
        np.testing.assert_allclose(got, expected.numpy(), atol=2.0 / 255 / config["std"][0])
    # One original pixel per 4x4 patch: every patch is constant.
    patches = pixels.unfold(2, 4, 4).unfold(3, 4, 4)
    assert torch.equal(patches, patches[..., :1, :1].expand_as(patches))


def test_training_is_deterministic():
    """Same seed, same weights; another seed, other weights. Three steps (48 images, batches of 16, with
    augmentation) exercise every seeded part (init, shuffling, shifts, drop-path RNG) at a fraction of the cost."""
    config = dataclasses.replace(TINY, epochs=1, train_limit=48, max_shift=1)
    model_a, accuracy_a = train(seed=0, config=config)
    model_b, accuracy_b = train(seed=0, config=config)
    model_c, _ = train(seed=1, config=config)
    assert weights_fingerprint(model_a) == weights_fingerprint(model_b)
    assert accuracy_a == accuracy_b
    assert weights_fingerprint(model_c) != weights_fingerprint(model_a)
    assert weights_fingerprint(model_a) != weights_fingerprint(build_model(0))  # it did train
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is restored


@pytest.mark.slow
def test_short_training_learns():
    _, accuracy = train(seed=0, config=SHORT)
    assert accuracy > 0.3, f"short training reached only {accuracy:.1%} on the test split (chance is 10%)"


def test_committed_weights_reach_recorded_accuracy(trained, test_set, record):
    assert ASSET_WEIGHTS.stat().st_size < 10 * 2**20
    pixels, labels = test_set
    accuracy = evaluate(trained, pixels, labels)
    assert abs(accuracy - recorded_accuracy()) <= 0.005, (accuracy, recorded_accuracy())
    assert accuracy >= 0.95
    assert weights_fingerprint(trained) == record["weights_sha256"]


def test_safetensors_metadata():
    from safetensors import safe_open

    with safe_open(str(ASSET_WEIGHTS), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["arch"] == ARCH
    assert abs(float(metadata["accuracy"]) - recorded_accuracy()) < 1e-6
    assert int(metadata["seed"]) == json.loads(ASSET_JSON.read_text())["seed"]
    assert json.loads(metadata["split"])["random_state"] == 0


def test_loader_uses_committed_weights(trained):
    fingerprint = weights_fingerprint(trained)
    by_name = load_model(ARCH)  # no --checkpoint: the committed trained weights
    assert by_name.weights.startswith("local pretrained weights") and ASSET_WEIGHTS.name in by_name.weights
    assert not by_name.random_weights and by_name.arch == ARCH
    assert weights_fingerprint(by_name.model) == fingerprint
    by_checkpoint = load_model(ARCH, checkpoint=str(ASSET_WEIGHTS))
    by_file = load_model(str(ASSET_WEIGHTS))  # arch from the safetensors metadata
    assert by_file.arch == ARCH
    assert weights_fingerprint(by_checkpoint.model) == weights_fingerprint(by_file.model) == fingerprint


def test_tome_keeps_accuracy(trained, test_set):
    pixels, labels = test_set
    base = evaluate(trained, pixels, labels)
    tome, schedule = apply_tome(trained, MODERATE_R, strict=True)
    merged = evaluate(tome, pixels, labels)
    assert schedule.tokens[-1] == 65 - 6 * MODERATE_R
    assert merged >= base - 0.02, f"r={MODERATE_R}: {merged:.2%} vs {base:.2%} at r=0"
