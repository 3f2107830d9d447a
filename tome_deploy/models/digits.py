"""A small ViT trained on the 8x8 digits scikit-learn ships: a real, reproducible model to measure what ToMe costs in accuracy.

The data is the UCI "Optical Recognition of Handwritten Digits" test set as scikit-learn's
`sklearn.datasets.load_digits` ships it (1797 greyscale 8x8 images, values 0..16). A copy ships with this
package, `tome_deploy/assets/digits.npz` (described in `digits.json`), so neither scikit-learn nor a
download is needed. Each image is scaled to [0, 1] (value / 16; the model's mean is 0
and std 1), enlarged 4x by pixel repetition
to 32x32 and repeated over 3 channels, so every 4x4 patch of the ViT is exactly one original pixel and
the model sees 64 patch tokens plus a class token.

The split is fixed: the indices `train_test_split(indices, test_size=0.2, stratify=labels, random_state=0)`
gave (1437 training and 360 test images) are stored in the same file, in the order it returned them.
Training (`tome_deploy/models/digits_training.py`) is seeded and runs with deterministic algorithms on
the CPU (a few minutes on 2 cores); `benchmarks/train_digits_vit.py` writes the result to
`tome_deploy/assets/digits_vit.safetensors`, which ships with the package.

The architecture is registered with timm as `tome_digits_vit` (importing this module registers it), so
`tome-export tome_digits_vit` works. Its pretrained config names the committed weights as a local `file`,
so the loader (like `timm.create_model(ARCH, pretrained=True)`) uses them when no `--checkpoint` is given."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

ARCH = "tome_digits_vit"
ASSETS = Path(__file__).resolve().parents[1] / "assets"
ASSET_WEIGHTS = ASSETS / "digits_vit.safetensors"
ASSET_JSON = ASSETS / "digits_vit.json"
ASSET_DATA = ASSETS / "digits.npz"  # the digits and the split; digits.json says where they come from

UPSCALE = 4  # 8x8 digits -> 32x32 images; one original pixel per 4x4 patch
IMG_SIZE = 8 * UPSCALE
# Pixels are value / 16 in [0, 1], fed as they are: a blank (0) patch then carries only its position
# embedding, which trains markedly faster from scratch than a [-1, 1] input.
MEAN = (0.0, 0.0, 0.0)
STD = (1.0, 1.0, 1.0)

# The ViT: 64 patch tokens + a class token, pooled on the class token.
MODEL_ARGS = dict(
    img_size=IMG_SIZE,
    patch_size=UPSCALE,
    in_chans=3,
    num_classes=10,
    embed_dim=96,
    depth=6,
    num_heads=3,
    mlp_ratio=4.0,
    class_token=True,
    global_pool="token",
)

# How the stored split was drawn: what train_test_split was called with.
SPLIT = {
    "dataset": "sklearn.datasets.load_digits",
    "method": "sklearn.model_selection.train_test_split(stratify=target)",
    "test_size": 0.2,
    "random_state": 0,
}

default_cfgs = {
    ARCH: dict(
        file=str(ASSET_WEIGHTS),  # timm.create_model(ARCH, pretrained=True) loads the committed weights
        input_size=(3, IMG_SIZE, IMG_SIZE),
        interpolation="nearest",  # pixel repetition, which is how the 8x8 digits were enlarged
        crop_pct=1.0,
        mean=MEAN,
        std=STD,
        num_classes=10,
        first_conv="patch_embed.proj",
        classifier="head",
        label_names=[str(d) for d in range(10)],
        license="apache-2.0",
        description="ViT (embed 96, depth 6, 3 heads, patch 4) trained on scikit-learn's 8x8 digits enlarged to 32x32",
    ),
}


@register_model
def tome_digits_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT for 32x32 digit images (8x8 digits enlarged 4x): 64 patches of 4x4, embed 96, depth 6, 3 heads."""
    args = dict(MODEL_ARGS, **kwargs)
    return build_model_with_cfg(VisionTransformer, ARCH, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **args)


# ----------------------------------------------------------------------------------------------------------
# Data


def pixels_from_digits(images: torch.Tensor) -> torch.Tensor:
    """Digits [B, 8, 8] with values 0..16 -> normalised model input [B, 3, 32, 32] (float32)."""
    x = images.to(torch.float32) / 16.0
    x = x.repeat_interleave(UPSCALE, dim=-2).repeat_interleave(UPSCALE, dim=-1)  # nearest-neighbour enlarge
    x = x.unsqueeze(1).expand(-1, 3, -1, -1)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def digits_data(path: Path = ASSET_DATA) -> dict[str, np.ndarray]:
    """The shipped digits: images (uint8 [1797, 8, 8], values 0..16), labels (uint8 [1797]) and the
    split's train_indices (int16 [1437]) and test_indices (int16 [360])."""
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def _split_indices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [1797, 8, 8] float, labels [1797] int64, train indices, test indices)."""
    data = digits_data()
    images = torch.from_numpy(data["images"].astype(np.float32))
    labels = torch.from_numpy(data["labels"].astype(np.int64))
    train_idx = torch.from_numpy(data["train_indices"].astype(np.int64))
    test_idx = torch.from_numpy(data["test_indices"].astype(np.int64))
    return images, labels, train_idx, test_idx


def split_fingerprint() -> str:
    """sha256 of the sorted test indices (the first 16 hex digits), as the training record states it."""
    _, _, _, test_idx = _split_indices()
    return hashlib.sha256(json.dumps(sorted(test_idx.tolist())).encode()).hexdigest()[:16]


def digits_train_set() -> tuple[torch.Tensor, torch.Tensor]:
    """Training split as raw digits: (images [1437, 8, 8], values 0..16; labels [1437])."""
    images, labels, train_idx, _ = _split_indices()
    return images[train_idx], labels[train_idx]


def digits_test_set() -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out split as model input: (pixels [360, 3, 32, 32] normalised; labels [360])."""
    images, labels, _, test_idx = _split_indices()
    return pixels_from_digits(images[test_idx]), labels[test_idx]


@torch.inference_mode()
def evaluate(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of `model` in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(pixels[start : start + batch_size])
        correct += int((logits.argmax(dim=-1) == labels[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / len(labels)


def load_digits_vit(weights: Path | str = ASSET_WEIGHTS) -> VisionTransformer:
    """The committed trained model (eval mode)."""
    from safetensors.torch import load_file

    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"no trained digits weights at {path}; run python benchmarks/train_digits_vit.py")
    import timm

    model = timm.create_model(ARCH)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def recorded_accuracy(record: Path = ASSET_JSON) -> float:
    """The test accuracy the training run recorded next to the committed weights (a fraction)."""
    return float(json.loads(Path(record).read_text())["test_accuracy"])


def write_digits_folder(root: Path | str, split: str = "test") -> list[Path]:
    """The digits of `split` ("test": the 360 the model never trained on; "all": 1797) as an image folder for
    tome-tune and tome-validate --data: root/<label>/<index>.png, 8x8 greyscale, value * 255 / 16 rounded.
    The model's preprocessing (nearest-neighbour resize to 32x32, pixels / 255) gives back value / 16 to
    within 1/510. Returns the files written."""
    from PIL import Image

    if split not in ("test", "all"):
        raise ValueError(f"split is 'test' or 'all', got {split!r}")
    data = digits_data()
    indices = data["test_indices"] if split == "test" else np.arange(len(data["labels"]))
    written = []
    for index in sorted(int(i) for i in indices):
        folder = Path(root) / str(int(data["labels"][index]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(data["images"][index].astype(np.float32) * 255.0 / 16.0).astype(np.uint8)  # [8, 8]
        path = folder / f"{index:04d}.png"
        Image.fromarray(pixels, mode="L").save(path)
        written.append(path)
    return written
