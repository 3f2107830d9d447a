"""The inputs of the README's video and audio merge pictures: random-weight models of realistic shape and
natural-like inputs, written to a folder, for `tome-visualize` to draw.

No pretrained weights are needed: ToMe matches tokens by the similarity of their keys, and even random
projections keep the input's similarity (sky with sky, silence with silence), so the groups follow the input.

- `videomae/`: a `VideoMAEForVideoClassification` of ViT-S width (384, 12 blocks, 6 heads), 6 frames of 224 x 224
  in tubelets of 2 frames x 16 x 16 pixels: 3 x 14 x 14 = 588 tokens.
- `clip/`: 6 JPEG frames of a camera panning right across the bundled photograph of a pagoda.
- `ast/`: an `ASTForAudioClassification` of the same width and its `ASTFeatureExtractor`, 512 frames x 128 mel
  bins (5.1 s; AST's checkpoints take 1024): 12 x 50 = 600 overlapping patches.
- `chirp.npy`: the log-mel spectrogram [512, 128] of two steady tones over a rising chirp, normalised as the
  feature extractor normalises.

    python benchmarks/visualize_examples.py                    # writes benchmarks/out/examples/
    tome-visualize benchmarks/out/examples/videomae benchmarks/out/examples/clip --r 30 --scale 1 -o docs/merges_video.gif
    tome-visualize benchmarks/out/examples/ast benchmarks/out/examples/chirp.npy --r 30 -o docs/merges_audio.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from tome_deploy.models.hf_audio import read_preprocessing, spectrogram_spec
from tome_deploy.validation.probes import SAMPLE_PHOTOS, sample_photo, tone_spectrograms

ROOT = Path(__file__).resolve().parents[1]
WIDTH, BLOCKS, HEADS = 384, 12, 6  # ViT-S's width and depth
FRAMES = 6
PAN_STEP_PX = 16  # the camera moves this far right across the 640 x 427 photograph per frame
SPECTROGRAM_FRAMES, MEL_BINS = 512, 128
SEED = 0  # of the random weights: the same pictures on every run


def write_video_model(folder: Path) -> None:
    """A random-weight VideoMAE classifier (mean pooling) saved with save_pretrained."""
    import transformers

    config = transformers.VideoMAEConfig(
        hidden_size=WIDTH,
        num_hidden_layers=BLOCKS,
        num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH,
        num_frames=FRAMES,
        num_labels=10,
    )
    transformers.VideoMAEForVideoClassification(config).save_pretrained(folder)


def write_panning_clip(folder: Path) -> None:
    """FRAMES square windows of the pagoda photograph, each PAN_STEP_PX right of the last, as JPEG files."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = sample_photo(SAMPLE_PHOTOS[0])  # 640 x 427
    side = photo.height
    for t in range(FRAMES):
        left = t * PAN_STEP_PX
        photo.crop((left, 0, left + side, side)).save(folder / f"frame{t}.jpg", quality=90)


def write_audio_model_and_spectrogram(folder: Path, spectrogram_path: Path) -> None:
    """A random-weight AST classifier and its feature extractor (save_pretrained), and the tones-and-chirp
    spectrogram [SPECTROGRAM_FRAMES, MEL_BINS] that extractor's settings give, saved with numpy.save."""
    import transformers

    config = transformers.ASTConfig(
        hidden_size=WIDTH,
        num_hidden_layers=BLOCKS,
        num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH,
        max_length=SPECTROGRAM_FRAMES,
        num_mel_bins=MEL_BINS,
        num_labels=10,
    )
    transformers.ASTForAudioClassification(config).save_pretrained(folder)
    transformers.ASTFeatureExtractor(max_length=SPECTROGRAM_FRAMES, num_mel_bins=MEL_BINS).save_pretrained(folder)
    spec = spectrogram_spec(config, read_preprocessing(folder, config))
    np.save(spectrogram_path, tone_spectrograms(1, spec)[0])  # [time, mel]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "examples", help="folder to write")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)
    write_video_model(out / "videomae")
    write_panning_clip(out / "clip")
    torch.manual_seed(SEED)
    write_audio_model_and_spectrogram(out / "ast", out / "chirp.npy")
    print(f"wrote {out}: videomae/, clip/ ({FRAMES} frames), ast/, chirp.npy")


if __name__ == "__main__":
    main()
