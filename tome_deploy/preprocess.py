"""timm's eval transform (resize shorter side to size / crop_pct, center crop, normalise), from model data."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def eval_transform(
    image: Image.Image,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
) -> np.ndarray:
    """PIL image -> float32 [3, H, W] ready for the model."""
    _, height, width = input_size
    scale = max(height, width) / crop_pct
    short = math.floor(scale)
    image = image.convert("RGB")
    w, h = image.size
    new_w, new_h = (short, round(h * short / w)) if w <= h else (round(w * short / h), short)
    image = image.resize((new_w, new_h), _RESAMPLE.get(interpolation, Image.Resampling.BICUBIC))
    left, top = round((new_w - width) / 2), round((new_h - height) / 2)
    image = image.crop((left, top, left + width, top + height))
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0  # [3, H, W]
    return (pixels - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
