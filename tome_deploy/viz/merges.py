"""Which patches ToMe merged together, drawn over the image (like the figures of the ToMe paper).

`merge_groups` runs a ToMe model with source tracking and returns, for every patch of the grid, the final
token it ended up in; `render_merges` paints each group over the image. `load_image` and `model_input`
give the image exactly as the model sees it (timm's eval transform: resize, centre crop, normalise)."""

from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
from PIL import Image

from tome_deploy.artifact.input_spec import InputSpec
from tome_deploy.errors import InvalidInputError
from tome_deploy.input_files import check_input_file, open_input
from tome_deploy.output_files import write_atomically

Style = Literal["mean", "overlay"]
STYLES: tuple[str, ...] = ("mean", "overlay")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file as RGB; InvalidInputError when it is missing or not an image."""
    path = check_input_file(path, "image")  # a FIFO or device is refused before it is opened
    try:
        with open_input(path, "image") as stream, Image.open(stream) as image:
            return image.convert("RGB")  # decodes every pixel: a truncated file fails here, not later
    except InvalidInputError:
        raise
    except Image.DecompressionBombError as err:
        raise InvalidInputError(f"image {path} is too large to decode safely ({err}); pass a smaller image") from None
    except Exception as err:  # noqa: BLE001 - UnidentifiedImageError, OSError (truncated), SyntaxError, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidInputError(
            f"image {path} cannot be decoded ({type(err).__name__}: {reason}); pass a PNG/JPEG image"
        ) from None


def model_input(image: Image.Image, spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """timm's eval transform for a model's image input spec (its adapter's `input_spec`).

    -> (normalised float32 [3, H, W] for the model, the same crop un-normalised as uint8 RGB [H, W, 3]).
    InvalidInputError for an input that is not an image.
    """
    from tome_deploy.preprocess import eval_transform

    if spec.kind != "image":
        raise InvalidInputError(
            f"tome-visualize draws merges on an image, but this model takes {spec.kind_phrase} input "
            f"{spec.describe_shape()}; pass an image model"
        )
    config = spec.preprocessing
    pixels = eval_transform(
        image,
        spec.shape,
        config["mean"],
        config["std"],
        crop_pct=config["crop_pct"],
        interpolation=config["interpolation"],
    )
    mean = np.asarray(config["mean"], np.float32)[:, None, None]
    std = np.asarray(config["std"], np.float32)[:, None, None]
    rgb = np.clip(np.rint((pixels * std + mean) * 255.0), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    return pixels, rgb


def merge_groups(tome_model, pixels, *, batched: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(group id of every patch [grid_h, grid_w], patches per group [G]) for one image or spectrogram.

    pixels: [3, H, W] or [1, 3, H, W] (tensor or array) at the size the model was patched at; batched=True:
    one input of any kind with its batch axis of 1 (a spectrogram [1, time, mel]). Group g is the g-th final
    non-prefix token; prefix tokens (class, registers, distillation) are left out, so G is the final token
    count minus the prefix count and every patch is in exactly one group.
    """
    import torch

    from tome_deploy.models.patch import tome_blocks, track_sources

    pixels = torch.as_tensor(pixels, dtype=torch.float32)
    if not batched and pixels.ndim == 3:
        pixels = pixels[None]
    if (not batched and pixels.ndim != 4) or pixels.shape[0] != 1:
        raise InvalidInputError(
            f"merge_groups takes one image [3, H, W] or [1, 3, H, W] (or, batched, one input [1, ...]), got shape "
            f"{tuple(pixels.shape)}"
        )
    shape = tome_blocks(tome_model).shape
    prefix = shape.num_prefix
    grid_h, grid_w = shape.grid
    was_training = tome_model.training
    try:
        with torch.no_grad():
            source, _ = track_sources(tome_model.eval(), pixels)  # eval: no token/patch dropout
    finally:
        tome_model.train(was_training)
    patches = source[0, prefix:, prefix:]  # [G, grid_h * grid_w]: group i holds patch j
    if patches.shape[1] != grid_h * grid_w:
        raise InvalidInputError(
            f"the model has {patches.shape[1]} patch tokens but a {grid_h}x{grid_w} grid; merge_groups needs a "
            "model whose tokens are its patch grid plus prefix tokens"
        )
    groups = patches.argmax(dim=0)  # one-hot columns: argmax is the one group
    if not torch.equal(patches.sum(dim=0), torch.ones(grid_h * grid_w)) or source[0, :prefix, prefix:].any():
        raise RuntimeError("source tracking lost or duplicated a patch; this is a bug in tome-deploy")
    sizes = patches.sum(dim=1).round().to(torch.int64)
    return groups.reshape(grid_h, grid_w).numpy().astype(np.int64), sizes.numpy()


def group_colours(count: int, seed: int = 0) -> np.ndarray:
    """count distinct, saturated RGB colours [count, 3] uint8 (golden-ratio hue steps, varied lightness)."""
    hue = (np.arange(count) * 0.6180339887 + 0.11 * seed) % 1.0
    colours = [colorsys.hls_to_rgb(h, 0.45 + 0.15 * (i % 3) / 2, 0.75 + 0.2 * (i % 2)) for i, h in enumerate(hue)]
    return np.clip(np.rint(np.asarray(colours, np.float64).reshape(count, 3) * 255), 0, 255).astype(np.uint8)


def _pixel_groups(groups: np.ndarray, height: int, width: int) -> np.ndarray:
    """The patch grid spread over height x width pixels (nearest patch)."""
    grid_h, grid_w = groups.shape
    rows = np.arange(height) * grid_h // height
    cols = np.arange(width) * grid_w // width
    return groups[rows[:, None], cols[None, :]]


def _borders(labels: np.ndarray, width: int) -> np.ndarray:
    """Boolean mask of pixels on a boundary between two labels, about `width` pixels thick."""
    edge = np.zeros(labels.shape, dtype=bool)
    vertical = labels[:, 1:] != labels[:, :-1]
    horizontal = labels[1:, :] != labels[:-1, :]
    edge[:, 1:] |= vertical
    edge[1:, :] |= horizontal
    for _ in range(max(0, width - 1)):  # thicken towards the top-left neighbours
        grown = edge.copy()
        grown[:, :-1] |= edge[:, 1:]
        grown[:-1, :] |= edge[1:, :]
        edge = grown
    return edge


def render_merges(
    image_rgb: np.ndarray,
    groups: np.ndarray,
    *,
    style: Style = "mean",
    scale: int = 1,
    border: int = 1,
    border_colour: Sequence[int] = (255, 255, 255),
    alpha: float = 0.55,
    num_groups: Optional[int] = None,
) -> Image.Image:
    """Paint every merged group over the image.

    image_rgb: uint8 [H, W, 3], the model's input crop; groups: [grid_h, grid_w] group ids (`merge_groups`).
    style "mean": each group filled with its mean image colour (the ToMe paper's look); "overlay": each
    group tinted with its own colour (alpha of the tint). Borders of `border` pixels (0: none) separate
    groups. scale: integer upscaling of the output, so that small inputs stay readable. num_groups: the ids are
    0..num_groups-1 of a larger set (a clip's, drawn frame by frame), so a group gets the same tint in every
    drawing; None numbers the ids present.
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise InvalidInputError(f"image_rgb must be uint8 [H, W, 3], got {image_rgb.dtype} {image_rgb.shape}")
    groups = np.asarray(groups)
    if groups.ndim != 2:
        raise InvalidInputError(f"groups must be a [grid_h, grid_w] map, got shape {groups.shape}")
    if style not in STYLES:
        raise InvalidInputError(f"unknown style {style!r}; choose one of {', '.join(STYLES)}")
    if scale < 1:
        raise InvalidInputError(f"scale must be a positive integer, got {scale}")
    height, width = image_rgb.shape[:2]
    out_h, out_w = height * scale, width * scale
    if num_groups is None:
        _, labels = np.unique(groups, return_inverse=True)  # ids -> 0..G-1
        labels, count = labels.reshape(groups.shape), int(labels.max()) + 1
    else:
        labels, count = groups, num_groups

    if style == "mean":
        at_input = _pixel_groups(labels, height, width).ravel()
        totals = np.zeros((count, 3), np.float64)
        np.add.at(totals, at_input, image_rgb.reshape(-1, 3).astype(np.float64))
        means = np.rint(totals / np.maximum(np.bincount(at_input, minlength=count), 1)[:, None]).astype(np.uint8)
        at_output = _pixel_groups(labels, out_h, out_w)
        canvas = means[at_output]
    else:
        photo = (
            image_rgb
            if scale == 1
            else np.asarray(Image.fromarray(image_rgb).resize((out_w, out_h), Image.Resampling.BICUBIC))
        )
        at_output = _pixel_groups(labels, out_h, out_w)
        tint = group_colours(count)[at_output].astype(np.float32)
        canvas = np.rint((1 - alpha) * photo.astype(np.float32) + alpha * tint).astype(np.uint8)

    if border > 0:
        canvas = canvas.copy()
        canvas[_borders(at_output, border)] = np.asarray(border_colour, np.uint8)
    return Image.fromarray(canvas, "RGB")


def side_by_side(
    panels: Sequence[Image.Image], gap: int = 8, background: Sequence[int] = (255, 255, 255)
) -> Image.Image:
    """Panels left to right, top-aligned, `gap` pixels apart."""
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    height = max(p.height for p in panels)
    sheet = Image.new("RGB", (width, height), tuple(background))
    x = 0
    for panel in panels:
        sheet.paste(panel, (x, 0))
        x += panel.width + gap
    return sheet


def save_png(image: Image.Image, output: str | Path) -> Path:
    """Write a PNG atomically; refuses a missing folder."""
    return write_atomically(output, lambda stream: image.save(stream, format="PNG", optimize=True))
