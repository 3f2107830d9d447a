"""What a model takes in: the input's kind, its name, its whole static shape (one sample, no batch) and how a
client prepares it. Recorded in an artifact's metadata and read by probes, the FLOP model, the server, the
Triton repository and the benchmarks. Imports no torch.

Kinds and their per-sample shapes:
  image              [C, H, W]        preprocessing: mean, std (C entries), interpolation, crop_pct
                                      (resize the short side to max(H, W) / crop_pct, centre crop, normalise)
  video              [T, C, H, W]     as image, per frame, plus `sampling`: how the T frames are taken
                                      from a clip ("uniform": evenly spaced over the whole clip)
  audio_spectrogram  [time, mel]      the log-mel filter bank a feature extractor computes from a waveform:
                                      feature_extractor (its class name), sampling_rate, num_mel_bins (= mel),
                                      max_length (= time), mean, std, do_normalize
                                      (normalised as (fbank - mean) / (2 * std) when do_normalize)
A reader checks types and bounds (FieldError, "must be ..., got ...") so a crafted file cannot drive
allocations: every side is bounded and one sample holds at most MAX_SAMPLE_ELEMENTS numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from tome_deploy.artifact import checks
from tome_deploy.artifact.checks import FieldError

INPUT_KINDS: tuple[str, ...] = ("image", "video", "audio_spectrogram")
INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
FRAME_SAMPLINGS: tuple[str, ...] = ("uniform",)
# kind -> how messages name it, article included
KIND_PHRASES = {"image": "an image", "video": "a video", "audio_spectrogram": "an audio spectrogram"}

MAX_CHANNELS = 16
MAX_IMAGE_SIDE = 2048
MAX_FRAMES = 512
MAX_SPECTROGRAM_TIME = 16384
MAX_MEL_BINS = 1024
MAX_SAMPLE_ELEMENTS = 1 << 26  # 64 Mi numbers (256 MiB in fp32) in one sample
MAX_NAME_LENGTH = 128

# kind -> the names of its axes, in order
AXES: dict[str, tuple[str, ...]] = {
    "image": ("channels", "height", "width"),
    "video": ("frames", "channels", "height", "width"),
    "audio_spectrogram": ("time", "mel"),
}


def _side(limit: int) -> Callable[[Any], int]:
    return lambda v: checks.whole(v, 1, limit)


_AXIS_LIMITS = {
    "channels": MAX_CHANNELS,
    "height": MAX_IMAGE_SIDE,
    "width": MAX_IMAGE_SIDE,
    "frames": MAX_FRAMES,
    "time": MAX_SPECTROGRAM_TIME,
    "mel": MAX_MEL_BINS,
}


@dataclass(frozen=True)
class InputSpec:
    """One model input. `shape` is one sample's static shape (the batch axis comes in front of it)."""

    kind: str
    name: str
    shape: tuple[int, ...]
    preprocessing: Mapping[str, Any] = field(default_factory=dict)

    def axis(self, name: str) -> int:
        """The size of one named axis of the kind (AXES), e.g. spec.axis("frames")."""
        return self.shape[AXES[self.kind].index(name)]

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of an image or of each video frame."""
        if self.kind not in ("image", "video"):
            raise ValueError(f"a {self.kind} input has no image size")
        return self.axis("height"), self.axis("width")

    @property
    def kind_phrase(self) -> str:
        """The kind as a message names it, article included: "an image", "a video", "an audio spectrogram"."""
        return KIND_PHRASES[self.kind]

    def describe_shape(self) -> str:
        """e.g. "[16, 3, 224, 224] (frames, channels, height, width)"."""
        return f"{list(self.shape)} ({', '.join(AXES[self.kind])})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "shape": list(self.shape),
            "preprocessing": dict(self.preprocessing),
        }

    @classmethod
    def from_dict(cls, value: Any) -> InputSpec:
        """A typed, bounded and self-consistent spec from its JSON object; FieldError says what is wrong."""
        if not isinstance(value, dict):
            raise FieldError(f"must be a JSON object, got {type(value).__name__}")
        missing = [key for key in ("kind", "name", "shape", "preprocessing") if key not in value]
        if missing:
            raise FieldError(f"has no {missing[0]!r}")
        kind = checks.checked("'kind'", lambda v: checks.one_of(v, INPUT_KINDS), value["kind"])
        name = checks.checked("'name'", lambda v: checks.name(v, MAX_NAME_LENGTH), value["name"])
        axes = AXES[kind]
        raw_shape = checks.checked("'shape'", lambda v: checks.items(v, len(axes)), value["shape"])
        shape = tuple(
            checks.checked(f"'shape' entry {i} ({axis})", _side(_AXIS_LIMITS[axis]), entry)
            for i, (axis, entry) in enumerate(zip(axes, raw_shape))
        )
        if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
            raise FieldError(f"'shape' {list(shape)} holds more than {MAX_SAMPLE_ELEMENTS} numbers in one sample")
        spec = cls(kind=kind, name=name, shape=shape, preprocessing={})
        preprocessing = checks.checked(
            "'preprocessing'", lambda v: _read_preprocessing(spec, v), value["preprocessing"]
        )
        return cls(kind=kind, name=name, shape=shape, preprocessing=preprocessing)


MAX_AXIS = max(_AXIS_LIMITS.values())  # the largest side any kind allows
MAX_SAMPLE_RANK = max(len(axes) for axes in AXES.values())


def sample_shape(value: Any) -> list[int]:
    """One sample's shape of any kind (e.g. an engine's input after the batch axis): 1 to MAX_SAMPLE_RANK whole
    numbers of 1 to MAX_AXIS, at most MAX_SAMPLE_ELEMENTS in all; FieldError otherwise."""
    shape = checks.each(checks.whole, value, 1, MAX_AXIS)
    if not 1 <= len(shape) <= MAX_SAMPLE_RANK:
        raise FieldError(f"must have 1 to {MAX_SAMPLE_RANK} entries, got {len(shape)}")
    if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
        raise FieldError(f"{shape} holds more than {MAX_SAMPLE_ELEMENTS} numbers in one sample")
    return shape


def image_spec(
    name: str, input_size: list[int], mean: list[float], std: list[float], interpolation: str, crop_pct: float
) -> InputSpec:
    """An image input [C, H, W] with timm's eval preprocessing."""
    preprocessing = {"mean": list(mean), "std": list(std), "interpolation": interpolation, "crop_pct": crop_pct}
    return InputSpec.from_dict(
        {"kind": "image", "name": name, "shape": list(input_size), "preprocessing": preprocessing}
    )


def _channels_values(spec: InputSpec, low: float) -> Callable[[Any], list[float]]:
    channels = spec.axis("channels")
    return lambda v: checks.each(checks.real, v, low, 1e3, length=channels)


def _frame_preprocessing(spec: InputSpec) -> dict[str, Callable[[Any], Any]]:
    return {
        "mean": _channels_values(spec, -1e3),
        "std": _channels_values(spec, 1e-6),
        "interpolation": lambda v: checks.one_of(v, INTERPOLATIONS),
        "crop_pct": lambda v: checks.real(v, 0.25, 1.0),
    }


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise FieldError(f"must be true or false, got {value!r}")
    return value


def _equal_to(expected: int, what: str) -> Callable[[Any], int]:
    def read(value: Any) -> int:
        number = checks.whole(value, 1, 1 << 31)
        if number != expected:
            raise FieldError(f"must equal the shape's {what} ({expected}), got {number}")
        return number

    return read


def _preprocessing_readers(spec: InputSpec) -> dict[str, Callable[[Any], Any]]:
    if spec.kind == "image":
        return _frame_preprocessing(spec)
    if spec.kind == "video":
        return {**_frame_preprocessing(spec), "sampling": lambda v: checks.one_of(v, FRAME_SAMPLINGS)}
    return {
        "feature_extractor": lambda v: checks.name(v, MAX_NAME_LENGTH),
        "sampling_rate": lambda v: checks.whole(v, 1000, 384000),
        "num_mel_bins": _equal_to(spec.axis("mel"), "mel axis"),
        "max_length": _equal_to(spec.axis("time"), "time axis"),
        "mean": lambda v: checks.real(v, -1e3, 1e3),
        "std": lambda v: checks.real(v, 1e-6, 1e3),
        "do_normalize": _boolean,
    }


def _read_preprocessing(spec: InputSpec, value: Any) -> dict[str, Any]:
    """Every key the kind needs, each checked; keys the kind does not know are dropped."""
    if not isinstance(value, dict):
        raise FieldError(f"must be a JSON object, got {type(value).__name__}")
    readers = _preprocessing_readers(spec)
    missing = [key for key in readers if key not in value]
    if missing:
        raise FieldError(f"has no {missing[0]!r} (a {spec.kind} input needs {', '.join(readers)})")
    return {key: checks.checked(repr(key), reader, value[key]) for key, reader in readers.items()}
