"""The image endpoint's two ends: encoded image bytes -> model input, logits -> top-k classes."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.errors import InvalidInputError
from tome_deploy.input_files import read_input_bytes
from tome_deploy.preprocess import eval_transform, resized_size


def image_to_input(body: bytes, metadata: ToMeMetadata, max_pixels: int) -> np.ndarray:
    """JPEG/PNG/... bytes -> float32 [1, 3, H, W] through timm's eval transform with the export's image input spec
    (InvalidInputError for a model whose input is not an image: it takes tensors at /infer).
    The pixel count is read from the header and refused before anything is decoded: a small compressed file
    can expand to gigabytes of pixels. The size after the resize (short side to the model's size / crop_pct,
    aspect ratio kept) is computed from the header too and held to the same limit: a 282-byte 1 x 50000 PNG
    passes the first check but resizes to 182 x 9100000 pixels (several GB)."""
    spec = metadata.input
    if spec.kind != "image":
        raise InvalidInputError(
            f"/classify takes an image, but this model takes {spec.kind_phrase} input "
            f"{spec.describe_shape()}; POST it as a tensor {spec.name!r} [batch, {', '.join(map(str, spec.shape))}] to /infer"
        )
    preprocessing, (height, width) = spec.preprocessing, spec.image_size
    try:
        image = Image.open(io.BytesIO(body))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise InvalidInputError(
            f"the body is not a decodable image ({type(err).__name__}); POST the raw bytes of a JPEG or PNG file"
        ) from None
    if image.width <= 0 or image.height <= 0:
        raise InvalidInputError(
            f"the body is not a decodable image (its header says {image.width}x{image.height} pixels); POST the raw bytes of a JPEG or PNG file"
        )
    if image.width * image.height > max_pixels:
        raise InvalidInputError(
            f"the image has {image.width}x{image.height} pixels, over --max-image-pixels {max_pixels}; send a smaller image (the model sees {height}x{width})"
        )
    resized = resized_size(image.width, image.height, spec.shape, preprocessing["crop_pct"])
    if resized[0] * resized[1] > max_pixels:
        raise InvalidInputError(
            f"the image has {image.width}x{image.height} pixels, which the eval transform resizes to {resized[0]}x{resized[1]} "
            f"(short side {min(resized)}, aspect ratio kept), over --max-image-pixels {max_pixels}; crop it closer to square "
            f"(the model sees {height}x{width})"
        )
    try:
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise InvalidInputError(
            f"the body is not a decodable image ({type(err).__name__}); POST the raw bytes of a JPEG or PNG file"
        ) from None
    pixels = eval_transform(
        image,
        spec.shape,
        preprocessing["mean"],
        preprocessing["std"],
        preprocessing["crop_pct"],
        preprocessing["interpolation"],
    )
    return pixels[None]  # [1, 3, H, W]


def top_k(logits: np.ndarray, k: int, labels: Optional[Sequence[str]] = None) -> list[dict]:
    """logits [C] -> the k most probable classes by softmax, ties to the lower index."""
    shifted = logits.astype(np.float64) - logits.max()
    probabilities = np.exp(shifted) / np.exp(shifted).sum()
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [
        {"index": int(i), "score": float(probabilities[i]), **({"label": labels[i]} if labels else {})} for i in order
    ]


def parse_top_k(text: Optional[str], default: int, num_classes: int) -> int:
    if text is None:
        return min(default, num_classes)
    try:
        k = int(text)
    except ValueError:
        raise InvalidInputError(f"top_k must be an integer, got {text!r}") from None
    if not 1 <= k <= num_classes:
        raise InvalidInputError(f"top_k is {k}; pass 1 to {num_classes} (the model's number of classes)")
    return k


MAX_LABELS_BYTES = 16 << 20  # a labels file is read whole; ImageNet-21k's names take ~0.5 MB


def read_labels(path: str | Path, num_classes: int) -> tuple[str, ...]:
    """One class name per line, in class-index order. Only a regular file of at most MAX_LABELS_BYTES is read
    (a device such as /dev/zero or a huge file would be read without end)."""
    path = Path(path).expanduser()
    try:
        data = read_input_bytes(path, "labels file", MAX_LABELS_BYTES)  # a FIFO or device is refused unread
        labels = tuple(line.strip() for line in data.decode("utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(
            f"cannot read labels file {path} ({type(err).__name__}); pass a UTF-8 text file with one class name per line"
        ) from None
    if len(labels) != num_classes:
        raise InvalidInputError(
            f"labels file {path} has {len(labels)} names but the model has {num_classes} classes; give one name per class, one per line"
        )
    return labels
