"""Input specs as an artifact's `tome.input` holds them (JSON values), for tests of each kind."""

from __future__ import annotations


def video_input(frames: int, side: int) -> dict:
    """A clip of `frames` RGB frames of side x side, normalised with mean = std = 0.5, sampled uniformly."""
    return {
        "kind": "video",
        "name": "pixel_values",
        "shape": [frames, 3, side, side],
        "preprocessing": {
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "sampling": "uniform",
        },
    }


def audio_input(time: int, mel: int, mean: float = -4.27, std: float = 4.57) -> dict:
    """A [time, mel] log-mel spectrogram as ASTFeatureExtractor computes it at 16 kHz."""
    return {
        "kind": "audio_spectrogram",
        "name": "input_values",
        "shape": [time, mel],
        "preprocessing": {
            "feature_extractor": "ASTFeatureExtractor",
            "sampling_rate": 16000,
            "num_mel_bins": mel,
            "max_length": time,
            "mean": mean,
            "std": std,
            "do_normalize": True,
        },
    }
