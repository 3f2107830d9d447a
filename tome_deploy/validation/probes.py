"""The inputs parity is checked on: random pixels, a constant image (every patch identical, so matching
is decided by tie rules alone) and natural photographs: scikit-learn's two sample images (CC BY 2.0),
shipped as tome_deploy/assets/china.jpg and flower.jpg (sample_images.json gives their attribution)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

PROBE_KINDS = ("random", "constant", "natural")
SAMPLE_PHOTOS = tuple(Path(__file__).resolve().parents[1] / "assets" / name for name in ("china.jpg", "flower.jpg"))


def random_images(batch: int, input_size: Sequence[int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, *input_size)).astype(np.float32)


def constant_images(batch: int, input_size: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Mid-grey in every pixel, normalised like a real image."""
    grey = (0.5 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # [3]
    return np.broadcast_to(grey[None, :, None, None], (batch, *input_size)).astype(np.float32).copy()


def sample_photo(path: Path) -> Image.Image:
    """One of SAMPLE_PHOTOS, decoded (RGB, 640x427)."""
    with Image.open(path) as photo:
        return photo.convert("RGB")


def natural_images(
    batch: int,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float,
    interpolation: str,
) -> np.ndarray:
    from tome_deploy.preprocess import eval_transform

    photos = [sample_photo(path) for path in SAMPLE_PHOTOS]
    photos += [photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for photo in photos]
    return np.stack(
        [eval_transform(photos[i % len(photos)], input_size, mean, std, crop_pct, interpolation) for i in range(batch)]
    )


def probe_images(kind: str, batch: int, meta) -> np.ndarray:
    """meta: anything with input_size, mean, std, crop_pct, interpolation (ToMeMetadata)."""
    if kind == "random":
        return random_images(batch, meta.input_size)
    if kind == "constant":
        return constant_images(batch, meta.input_size, meta.mean, meta.std)
    if kind == "natural":
        return natural_images(batch, meta.input_size, meta.mean, meta.std, meta.crop_pct, meta.interpolation)
    raise ValueError(f"unknown probe kind {kind!r}; choose from {PROBE_KINDS}")
