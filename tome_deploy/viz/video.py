"""Which tubelets ToMe merged together in a video clip, drawn on every frame.

`load_clip` takes the frames of a folder of images (in name order) or of an animated GIF, `clip_input` samples
the model's frame count from them (the spec's "uniform" sampling) and prepares each frame as the model sees it,
`clip_merge_groups` runs the ToMe model with source tracking and returns, for every tubelet, the final token it
ended up in, and `render_clip` paints each frame with the groups of the tubelet step it belongs to, coloured
alike in every frame; `clip_sheet` lays the frames out in a grid and `save_gif` writes them as an animation."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from tome_deploy.artifact.input_spec import InputSpec, image_spec
from tome_deploy.errors import InvalidInputError
from tome_deploy.output_files import write_atomically
from tome_deploy.viz.merges import Style, load_image, model_input, render_merges, side_by_side

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
MAX_CLIP_FRAMES = 100_000  # frame files or GIF frames a clip may have (only the sampled ones are decoded)
GIF_FRAME_MS = 250


def is_clip_path(path: str | Path) -> bool:
    """A folder (of frames) or a .gif: what tome-visualize reads as a clip."""
    path = Path(path).expanduser()
    return path.is_dir() or path.suffix.lower() == ".gif"


def uniform_indices(available: int, count: int) -> list[int]:
    """The spec's "uniform" sampling: the middle frame of each of `count` equal parts of the clip (a clip shorter
    than `count` repeats frames)."""
    return [(2 * k + 1) * available // (2 * count) for k in range(count)]


def load_clip(path: str | Path, count: int) -> list[Image.Image]:
    """`count` RGB frames sampled uniformly from a folder of images (PNG, JPEG, BMP, WebP; name order) or an
    animated GIF; InvalidInputError when the path holds no frames or a frame cannot be decoded."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InvalidInputError(f"clip {path} does not exist; pass a folder of frames or a GIF")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file())
        if not files:
            raise InvalidInputError(
                f"clip folder {path} holds no frames; put the frames in it as {', '.join(FRAME_SUFFIXES)} files"
            )
        if len(files) > MAX_CLIP_FRAMES:
            raise InvalidInputError(f"clip folder {path} holds {len(files)} frames; the most is {MAX_CLIP_FRAMES}")
        return [load_image(files[i]) for i in uniform_indices(len(files), count)]
    return _gif_frames(path, count)


def _gif_frames(path: Path, count: int) -> list[Image.Image]:
    try:
        with Image.open(path) as gif:
            total = int(getattr(gif, "n_frames", 1))
            if total > MAX_CLIP_FRAMES:
                raise InvalidInputError(f"GIF {path} has {total} frames; the most is {MAX_CLIP_FRAMES}")
            frames = []
            for index in uniform_indices(total, count):
                gif.seek(index)
                frames.append(gif.convert("RGB"))
            return frames
    except InvalidInputError:
        raise
    except Exception as err:  # noqa: BLE001 - UnidentifiedImageError, OSError (truncated), DecompressionBombError, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InvalidInputError(f"GIF {path} cannot be decoded ({type(err).__name__}: {reason}); pass a GIF") from None


def clip_input(frames: Sequence[Image.Image], spec: InputSpec) -> tuple[np.ndarray, np.ndarray]:
    """Each frame through the eval transform of a video spec's frames.

    -> (normalised float32 [T, 3, H, W] for the model, the same crops un-normalised as uint8 RGB [T, H, W, 3])."""
    if spec.kind != "video":
        raise InvalidInputError(f"a clip goes to a video model, but this model takes {spec.kind_phrase} input")
    if len(frames) != spec.axis("frames"):
        raise InvalidInputError(f"the model takes {spec.axis('frames')} frames, got {len(frames)}")
    config = spec.preprocessing
    frame = image_spec(
        spec.name,
        list(spec.shape[1:]),
        mean=config["mean"],
        std=config["std"],
        interpolation=config["interpolation"],
        crop_pct=config["crop_pct"],
    )
    prepared = [model_input(image, frame) for image in frames]
    return np.stack([p for p, _ in prepared]), np.stack([rgb for _, rgb in prepared])


def clip_merge_groups(tome_model, pixels) -> tuple[np.ndarray, np.ndarray]:
    """(group id of every tubelet [steps, rows, columns], tubelets per group [G]) for one clip.

    pixels: [T, 3, H, W] at the size and frame count the model was patched at. Group g is the g-th final
    non-prefix token (a class token is left out), so every tubelet is in exactly one group."""
    import torch

    from tome_deploy.models.patch import tome_blocks, track_sources

    pixels = torch.as_tensor(pixels, dtype=torch.float32)[None]  # [1, T, 3, H, W]
    shape = tome_blocks(tome_model).shape
    prefix, grid = shape.num_prefix, tuple(shape.grid)
    if len(grid) != 3:
        raise InvalidInputError(
            f"clip_merge_groups needs a video model (a grid of tubelet steps, rows, columns); got grid {grid}"
        )
    was_training = tome_model.training
    try:
        with torch.no_grad():
            source, _ = track_sources(tome_model.eval(), pixels)  # eval: no dropout
    finally:
        tome_model.train(was_training)
    tubelets = source[0, prefix:, prefix:]  # [G, steps * rows * columns]: group i holds tubelet j
    if tubelets.shape[1] != int(np.prod(grid)) or not torch.equal(tubelets.sum(dim=0), torch.ones(tubelets.shape[1])):
        raise RuntimeError("source tracking lost or duplicated a tubelet; this is a bug in tome-deploy")
    groups = tubelets.argmax(dim=0).reshape(grid)  # one-hot columns: argmax is the one group
    return groups.numpy().astype(np.int64), tubelets.sum(dim=1).round().to(torch.int64).numpy()


def render_clip(rgb: np.ndarray, groups: np.ndarray, *, style: Style = "mean", scale: int = 1) -> list[Image.Image]:
    """One drawing per frame: rgb [T, H, W, 3] uint8, groups [steps, rows, columns]; frame t shows the groups of
    the tubelet step that holds it (t * steps // T), each group in the same colour in every frame."""
    frames, steps = rgb.shape[0], groups.shape[0]
    count = int(groups.max()) + 1
    return [
        render_merges(rgb[t], groups[t * steps // frames], style=style, scale=scale, num_groups=count)
        for t in range(frames)
    ]


def scaled_frames(rgb: np.ndarray, scale: int) -> list[Image.Image]:
    """The input frames [T, H, W, 3] as images, upscaled `scale` times."""
    height, width = rgb.shape[1:3]
    return [Image.fromarray(f).resize((width * scale, height * scale), Image.Resampling.BICUBIC) for f in rgb]


def clip_sheet(rows: Sequence[Sequence[Image.Image]], gap: int = 8) -> Image.Image:
    """Rows of frames (each row left to right), top to bottom, `gap` pixels apart."""
    lines = [side_by_side(list(row), gap) for row in rows]
    sheet = Image.new(
        "RGB",
        (max(line.width for line in lines), sum(line.height for line in lines) + gap * (len(lines) - 1)),
        (255, 255, 255),
    )
    y = 0
    for line in lines:
        sheet.paste(line, (0, y))
        y += line.height + gap
    return sheet


def save_gif(frames: Sequence[Image.Image], output: str | Path) -> Path:
    """An animated GIF of `frames` (GIF_FRAME_MS each, looping), written atomically."""
    first, *rest = frames
    return write_atomically(
        output,
        lambda stream: first.save(
            stream, format="GIF", save_all=True, append_images=rest, duration=GIF_FRAME_MS, loop=0
        ),
    )
