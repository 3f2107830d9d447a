"""Parity probes per kind of input: random, constant and natural-like, each [batch, *spec.shape] float32.

The natural audio probe is checked against the Hugging Face Audio Spectrogram Transformer's feature extractor
on the same waveform (its own numpy filter bank, not ours); the video probe's pan is found by searching the
shift between frames, and the constant probes are written out plainly."""

from __future__ import annotations

import numpy as np
import pytest

from tome_deploy.artifact.input_spec import InputSpec, image_spec
from tome_deploy.preprocess import eval_transform
from tome_deploy.validation.probes import (
    PROBE_KINDS,
    SAMPLE_PHOTOS,
    log_mel,
    probe_inputs,
    probe_label,
    sample_photo,
    tones_and_chirp,
)

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
IMAGE = image_spec("pixel_values", [3, 32, 32], MEAN, STD, "bicubic", 0.875)
VIDEO = InputSpec.from_dict(
    {
        "kind": "video",
        "name": "pixel_values",
        "shape": [4, 3, 32, 32],
        "preprocessing": {
            "mean": MEAN,
            "std": STD,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "sampling": "uniform",
        },
    }
)
AUDIO_PREPROCESSING = {
    "feature_extractor": "ASTFeatureExtractor",
    "sampling_rate": 16000,
    "num_mel_bins": 32,
    "max_length": 48,
    "mean": -4.2677393,
    "std": 4.5689974,
    "do_normalize": True,
}
AUDIO = InputSpec.from_dict(
    {"kind": "audio_spectrogram", "name": "input_values", "shape": [48, 32], "preprocessing": AUDIO_PREPROCESSING}
)


@pytest.mark.parametrize("spec", [IMAGE, VIDEO, AUDIO], ids=lambda s: s.kind)
@pytest.mark.parametrize("probe", PROBE_KINDS)
def test_every_probe_is_a_finite_float32_batch_of_the_spec_shape(spec, probe):
    inputs = probe_inputs(probe, 3, spec)
    assert inputs.shape == (3, *spec.shape) and inputs.dtype == np.float32 and np.isfinite(inputs).all()
    if probe != "constant":  # noise and natural inputs vary within a sample
        assert inputs[0].std() > 0.1


def test_the_parity_tables_name_the_natural_probe_by_kind():
    assert [probe_label("natural", s) for s in (IMAGE, VIDEO, AUDIO)] == ["natural", "moving", "tones"]
    assert probe_label("random", VIDEO) == "random" and probe_label("constant", AUDIO) == "constant"


def test_natural_images_are_the_sample_photos_through_the_eval_transform():
    photo = sample_photo(SAMPLE_PHOTOS[1])
    expected = eval_transform(photo, [3, 32, 32], MEAN, STD, 0.875, "bicubic")
    np.testing.assert_array_equal(probe_inputs("natural", 2, IMAGE)[1], expected)


def test_constant_video_is_mid_grey_in_every_frame():
    clip = probe_inputs("constant", 2, VIDEO)
    grey = [(0.5 - m) / s for m, s in zip(MEAN, STD)]
    for channel in range(3):
        np.testing.assert_allclose(clip[:, :, channel], grey[channel], rtol=1e-6)


def best_shift(first: np.ndarray, last: np.ndarray, most: int = 12) -> tuple[int, int]:
    """(dx, dy) >= 0 for which last[y, x] best matches first[y + dy, x + dx] (frames [C, H, W])."""
    height, width = first.shape[1:]
    errors = {
        (dx, dy): np.abs(last[:, : height - dy, : width - dx] - first[:, dy:, dx:]).mean()
        for dx in range(most)
        for dy in range(most)
    }
    return min(errors, key=errors.get)


def test_the_moving_video_pans_right_and_down_a_few_pixels_per_frame():
    clip = probe_inputs("natural", 1, VIDEO)[0]  # [T, C, H, W]
    # The window (80% of the 640 x 427 photograph: 512 x 342) pans by 20% of its size over the clip: 128 x 85
    # photograph pixels, which the resize of the window's short side to 32 px scales by 32 / 342: 12 x 8 px.
    dx, dy = best_shift(clip[0], clip[-1], most=16)
    assert 11 <= dx <= 13 and 7 <= dy <= 9, (dx, dy)
    assert not np.allclose(clip[0], clip[1])


def test_the_tone_spectrogram_is_what_the_audio_spectrogram_transformers_extractor_computes():
    from transformers import ASTFeatureExtractor

    extractor = ASTFeatureExtractor(num_mel_bins=32, max_length=48, do_normalize=True)
    for index in range(2):
        wave = tones_and_chirp(index, 16000, 47 * 160 + 400)
        expected = extractor(wave.astype(np.float32), sampling_rate=16000, return_tensors="np")["input_values"][0]
        np.testing.assert_allclose(probe_inputs("natural", 2, AUDIO)[index], expected, atol=1e-4)
    assert log_mel(wave, 16000, 32, 400, 160).shape == (48, 32)


def test_constant_audio_is_the_extractors_mean_level_normalised():
    np.testing.assert_array_equal(probe_inputs("constant", 2, AUDIO), np.zeros((2, 48, 32), np.float32))
    raw = InputSpec.from_dict({**AUDIO.to_dict(), "preprocessing": {**AUDIO_PREPROCESSING, "do_normalize": False}})
    np.testing.assert_allclose(probe_inputs("constant", 1, raw), np.full((1, 48, 32), -4.2677393), rtol=1e-6)


def test_an_unknown_probe_is_refused():
    with pytest.raises(ValueError, match="unknown probe kind 'noise'"):
        probe_inputs("noise", 1, IMAGE)
