"""The inputs parity is checked on, per kind of input (artifact/input_spec.py), three probes each:

  probe     image                     video                               audio spectrogram
  random    normal noise              normal noise                        normal noise
  constant  mid-grey everywhere       mid-grey in every frame             the extractor's mean level everywhere
  natural   the sample photographs    a photograph panned across frames   the log-mel of two tones and a chirp

A constant input makes every patch identical, so matching is decided by tie rules alone. The photographs
are scikit-learn's two sample images (CC BY 2.0), shipped as tome_deploy/assets/china.jpg and flower.jpg
(sample_images.json gives their attribution). The audio spectrogram is computed here with numpy (a Kaldi-style
log-mel filter bank: 25 ms Hann windows every 10 ms, pre-emphasis 0.97, triangular filters on the mel scale,
as Kaldi's `fbank` and the Audio Spectrogram Transformer's feature extractor compute it by default); a probe
only has to be natural-like, and the spectrogram of other extractors differs in detail."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from tome_deploy.artifact.input_spec import InputSpec

PROBE_KINDS = ("random", "constant", "natural")
# input kind -> what its "natural" probe is called in parity tables
NATURAL_LABELS = {"image": "natural", "video": "moving", "audio_spectrogram": "tones"}
SAMPLE_PHOTOS = tuple(Path(__file__).resolve().parents[1] / "assets" / name for name in ("china.jpg", "flower.jpg"))

PAN_FRACTION = 0.2  # a video probe's camera pans over this share of the photograph's width over the clip
FRAME_LENGTH_S = 0.025  # the log-mel's analysis window
FRAME_SHIFT_S = 0.010  # and its hop
LOWEST_MEL_HZ = 20.0
PREEMPHASIS = 0.97
LOG_FLOOR = 1.1920929e-07  # float32 epsilon: the log of silence stays finite


def probe_label(probe_kind: str, spec: InputSpec) -> str:
    """How parity tables name `probe_kind` for an input of `spec`'s kind (e.g. "moving" for natural video)."""
    return NATURAL_LABELS[spec.kind] if probe_kind == "natural" else probe_kind


def probe_inputs(probe_kind: str, batch: int, spec: InputSpec) -> np.ndarray:
    """One probe (a PROBE_KINDS entry) for `batch` samples of `spec` -> float32 [batch, *spec.shape]."""
    if probe_kind not in PROBE_KINDS:
        raise ValueError(f"unknown probe kind {probe_kind!r}; choose from {PROBE_KINDS}")
    if probe_kind == "random":
        return random_inputs(batch, spec.shape)
    if spec.kind == "audio_spectrogram":
        return constant_spectrograms(batch, spec) if probe_kind == "constant" else tone_spectrograms(batch, spec)
    if probe_kind == "constant":
        return constant_images(batch, spec.shape, spec.preprocessing["mean"], spec.preprocessing["std"])
    if spec.kind == "video":
        return panning_videos(batch, spec)
    return natural_images(batch, spec)


def random_inputs(batch: int, shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """Standard normal noise [batch, *shape]."""
    return np.random.default_rng(seed).standard_normal((batch, *shape)).astype(np.float32)


def constant_images(batch: int, shape: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Mid-grey in every pixel, normalised like a real image: [batch, *shape], shape [C, H, W] or [T, C, H, W]."""
    grey = (0.5 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # [C]
    return np.broadcast_to(grey[:, None, None], (batch, *shape)).astype(np.float32).copy()


def sample_photo(path: Path) -> Image.Image:
    """One of SAMPLE_PHOTOS, decoded (RGB, 640x427)."""
    with Image.open(path) as photo:
        return photo.convert("RGB")


def _photos() -> list[Image.Image]:
    """The sample photographs and their mirror images."""
    photos = [sample_photo(path) for path in SAMPLE_PHOTOS]
    return photos + [photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for photo in photos]


def _frame(image: Image.Image, shape: Sequence[int], preprocessing) -> np.ndarray:
    """One image through the spec's eval transform -> [C, H, W]."""
    from tome_deploy.preprocess import eval_transform

    return eval_transform(
        image,
        shape,
        preprocessing["mean"],
        preprocessing["std"],
        preprocessing["crop_pct"],
        preprocessing["interpolation"],
    )


def natural_images(batch: int, spec: InputSpec) -> np.ndarray:
    """The sample photographs (and mirrored), in turn, as the spec prepares them -> [batch, C, H, W]."""
    photos = _photos()
    return np.stack([_frame(photos[i % len(photos)], spec.shape, spec.preprocessing) for i in range(batch)])


def panning_videos(batch: int, spec: InputSpec) -> np.ndarray:
    """A camera panning across a sample photograph: frame t is a window of the photograph moved right and down
    by t steps, each frame prepared as the spec prepares it -> [batch, T, C, H, W]."""
    frames = spec.axis("frames")
    photos = _photos()
    clips = []
    for i in range(batch):
        photo = photos[i % len(photos)]
        width, height = photo.size
        window_w, window_h = round(width * (1 - PAN_FRACTION)), round(height * (1 - PAN_FRACTION))
        step = (width - window_w) / max(frames - 1, 1)
        clip = []
        for t in range(frames):
            left, top = round(t * step), round(t * step * height / width)
            clip.append(
                _frame(photo.crop((left, top, left + window_w, top + window_h)), spec.shape[1:], spec.preprocessing)
            )
        clips.append(np.stack(clip))  # [T, C, H, W]
    return np.stack(clips).astype(np.float32, copy=False)


def constant_spectrograms(batch: int, spec: InputSpec) -> np.ndarray:
    """The feature extractor's mean log-mel level in every cell, normalised as the spec says (0 when it
    normalises) -> [batch, time, mel]."""
    level = np.full((batch, *spec.shape), spec.preprocessing["mean"], np.float32)  # [batch, time, mel]
    return _normalised(level, spec.preprocessing).astype(np.float32, copy=False)


def tone_spectrograms(batch: int, spec: InputSpec) -> np.ndarray:
    """The log-mel spectrogram of two steady tones over a rising chirp (other pitches for each sample of the
    batch), as long as the spec's time axis, normalised as the spec says -> [batch, time, mel]."""
    rate = int(spec.preprocessing["sampling_rate"])
    time_frames = spec.axis("time")
    window, hop = round(FRAME_LENGTH_S * rate), round(FRAME_SHIFT_S * rate)
    samples = (time_frames - 1) * hop + window
    spectrograms = [
        _normalised(log_mel(tones_and_chirp(i, rate, samples), rate, spec.axis("mel"), window, hop), spec.preprocessing)
        for i in range(batch)
    ]  # each [time, mel]
    return np.stack(spectrograms).astype(np.float32, copy=False)


def tones_and_chirp(index: int, rate: int, samples: int) -> np.ndarray:
    """`samples` of a waveform at `rate` Hz: tones at 220 and 660 Hz raised `index` semitones, over a chirp rising
    linearly from 100 Hz to 0.4 x rate -> [samples], within [-0.6, 0.6]."""
    seconds = np.arange(samples) / rate  # [samples]
    low, high = 220.0 * 2 ** (index / 12), 660.0 * 2 ** (index / 12)
    chirp_start, chirp_end = 100.0, 0.4 * rate
    chirp_phase = chirp_start * seconds + (chirp_end - chirp_start) * seconds**2 / (2 * seconds[-1])
    return (
        0.3 * np.sin(2 * np.pi * low * seconds)
        + 0.2 * np.sin(2 * np.pi * high * seconds)
        + 0.1 * np.sin(2 * np.pi * chirp_phase)
    )


def _normalised(fbank: np.ndarray, preprocessing) -> np.ndarray:
    """(fbank - mean) / (2 std) when the spec normalises, else fbank unchanged."""
    if not preprocessing["do_normalize"]:
        return fbank
    return (fbank - preprocessing["mean"]) / (2 * preprocessing["std"])


def mel_scale(hz: np.ndarray) -> np.ndarray:
    return 1127.0 * np.log(1.0 + hz / 700.0)


def mel_filter_bank(num_mel: int, fft_size: int, rate: int) -> np.ndarray:
    """Triangular filters spaced evenly on the mel scale from LOWEST_MEL_HZ to the Nyquist frequency, over
    the rfft bins -> [num_mel, fft_size // 2 + 1]."""
    bins_mel = mel_scale(np.arange(fft_size // 2 + 1) * rate / fft_size)  # [F]
    edges = np.linspace(mel_scale(np.array(LOWEST_MEL_HZ)), mel_scale(np.array(rate / 2)), num_mel + 2)  # [M + 2]
    left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]  # [M, 1] each
    rising = (bins_mel[None, :] - left) / (centre - left)  # [M, F]
    falling = (right - bins_mel[None, :]) / (right - centre)  # [M, F]
    return np.clip(np.minimum(rising, falling), 0.0, None)


def log_mel(wave: np.ndarray, rate: int, num_mel: int, window: int, hop: int) -> np.ndarray:
    """The log mel-filter-bank energies of `wave` [samples]: frames of `window` samples every `hop`, each with its
    mean removed, pre-emphasised and Hann-windowed; the power spectrum zero-padded to a power of two, mel filters,
    natural log -> [frames, num_mel]."""
    frames = 1 + (len(wave) - window) // hop
    fft_size = 1 << math.ceil(math.log2(window))
    starts = np.arange(frames)[:, None] * hop  # [frames, 1]
    windows = wave[starts + np.arange(window)[None, :]]  # [frames, window]
    windows = windows - windows.mean(axis=1, keepdims=True)
    previous = np.concatenate([windows[:, :1], windows[:, :-1]], axis=1)  # [frames, window]: x[n - 1], x[0] first
    windows = (windows - PREEMPHASIS * previous) * np.hanning(window)[None, :]
    power = np.abs(np.fft.rfft(windows, n=fft_size, axis=1)) ** 2  # [frames, F]
    energies = power @ mel_filter_bank(num_mel, fft_size, rate).T  # [frames, num_mel]
    return np.log(np.maximum(energies, LOG_FLOOR))
