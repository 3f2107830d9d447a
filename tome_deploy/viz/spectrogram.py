"""A log-mel spectrogram for tome-visualize: read from a `.npy` file (its header checked before any data is
read) and drawn as a greyscale picture with time left to right and low frequencies at the bottom, so that
`merges.render_merges` can paint the merged groups of an audio model (grid (frequency, time)) over it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from tome_deploy.errors import InvalidInputError

_FLOAT_KINDS = "f"  # numpy dtype kinds a spectrogram may have
MAX_NPY_HEADER_BYTES = 1 << 16


def load_spectrogram(path: str | Path, shape: Sequence[int]) -> np.ndarray:
    """The spectrogram [time, mel] in a `.npy` file, as float32. `shape`: the model's (time, mel). The file may
    hold [time, mel] or [1, time, mel] floats; its header is read first, so a file of another shape or type
    is refused in one line before its data is allocated."""
    path = Path(path).expanduser()
    expected = tuple(int(v) for v in shape)
    hint = f"the model takes a [{expected[0]}, {expected[1]}] (time, mel) log-mel spectrogram saved with numpy.save"
    if not path.is_file():
        raise InvalidInputError(f"spectrogram {path} is not a file; {hint}")
    try:
        with path.open("rb") as stream:
            version = np.lib.format.read_magic(stream)
            header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            file_shape, fortran_order, dtype = header(stream, max_header_size=MAX_NPY_HEADER_BYTES)
            if dtype.kind not in _FLOAT_KINDS or dtype.hasobject:
                raise InvalidInputError(f"spectrogram {path} holds {dtype} values, not floats; {hint}")
            if tuple(file_shape) not in (expected, (1, *expected)):
                raise InvalidInputError(
                    f"spectrogram {path} is {list(file_shape)}, not [{expected[0]}, {expected[1]}]; {hint} "
                    f"(a feature extractor pads or cuts to max_length={expected[0]} frames)"
                )
            data = np.fromfile(stream, dtype=dtype, count=math.prod(expected))
    except InvalidInputError:
        raise
    except (OSError, ValueError) as err:
        raise InvalidInputError(f"spectrogram {path} is not a readable .npy file ({err}); {hint}") from None
    if data.size != math.prod(expected):
        raise InvalidInputError(
            f"spectrogram {path} is truncated ({data.size} of {math.prod(expected)} values); {hint}"
        )
    spectrogram = data.reshape(expected, order="F" if fortran_order else "C").astype(np.float32)  # [time, mel]
    if not np.isfinite(spectrogram).all():
        raise InvalidInputError(f"spectrogram {path} holds NaN or infinite values; {hint}")
    return spectrogram


def spectrogram_rgb(spectrogram: np.ndarray) -> np.ndarray:
    """[time, mel] -> uint8 RGB [mel, time, 3]: grey levels stretched over the values' range, low mel bins at
    the bottom row."""
    low, high = float(spectrogram.min()), float(spectrogram.max())
    scaled = (spectrogram - low) / (high - low) if high > low else np.zeros_like(spectrogram)
    grey = np.rint(scaled.T[::-1] * 255.0).astype(np.uint8)  # [mel, time], mel bin 0 last
    return np.repeat(grey[:, :, None], 3, axis=2)


def groups_as_drawn(groups: np.ndarray) -> np.ndarray:
    """An audio model's group map [frequency, time] turned as `spectrogram_rgb` turns the spectrogram."""
    return np.ascontiguousarray(groups[::-1])
