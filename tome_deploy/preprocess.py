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


def resized_size(width: int, height: int, input_size: Sequence[int], crop_pct: float = 0.875) -> tuple[int, int]:
    """The (width, height) eval_transform resizes a width x height image to before its centre crop: the short
    side becomes floor(max(H, W) / crop_pct) and the long side keeps the aspect ratio (a 1 x 50000 image
    becomes 182 x 9100000). Computed from the size alone, so a server can refuse it before decoding."""
    _, crop_height, crop_width = input_size
    short = math.floor(max(crop_height, crop_width) / crop_pct)
    return (short, round(height * short / width)) if width <= height else (round(width * short / height), short)


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
    image = image.convert("RGB")
    new_w, new_h = resized_size(*image.size, input_size, crop_pct)
    image = image.resize((new_w, new_h), _RESAMPLE.get(interpolation, Image.Resampling.BICUBIC))
    left, top = round((new_w - width) / 2), round((new_h - height) / 2)
    image = image.crop((left, top, left + width, top + height))
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0  # [3, H, W]
    return (pixels - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
