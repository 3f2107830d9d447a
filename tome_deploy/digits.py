"""A small ViT trained on scikit-learn's digits: a real, reproducible model to measure what ToMe costs in accuracy.

The data is `sklearn.datasets.load_digits` (1797 greyscale 8x8 images, values 0..16, shipped with
scikit-learn, so nothing is downloaded). Each image is scaled to [0, 1] (value / 16; the model's mean is 0
and std 1), enlarged 4x by pixel repetition
to 32x32 and repeated over 3 channels, so every 4x4 patch of the ViT is exactly one original pixel and
the model sees 64 patch tokens plus a class token.

The split is fixed: `train_test_split(indices, test_size=0.2, stratify=labels, random_state=0)`, which
gives 1437 training and 360 test images. Training is seeded and runs with deterministic algorithms on
the CPU (a few minutes on 2 cores); `benchmarks/train_digits_vit.py` writes the result to
`tome_deploy/assets/digits_vit.safetensors`, which ships with the package.

The architecture is registered with timm as `tome_digits_vit` (importing this module registers it), so
`tome-export tome_digits_vit` works; with no `--checkpoint` the loader uses the committed trained weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

__all__ = [
    "ARCH",
    "ASSET_JSON",
    "ASSET_WEIGHTS",
    "BUNDLED_WEIGHTS_LABEL",
    "MODEL_ARGS",
    "SPLIT",
    "TrainConfig",
    "bundled_weights",
    "digits_test_set",
    "digits_train_set",
    "evaluate",
    "load_digits_vit",
    "pixels_from_digits",
    "save_digits_vit",
    "tome_digits_vit",
    "train",
]

ARCH = "tome_digits_vit"
ASSETS = Path(__file__).resolve().parent / "assets"
ASSET_WEIGHTS = ASSETS / "digits_vit.safetensors"
ASSET_JSON = ASSETS / "digits_vit.json"
BUNDLED_WEIGHTS_LABEL = "trained digits weights (committed)"

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

# The held-out split, as data: what train_test_split is called with.
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


def bundled_weights(name: str) -> Optional[tuple[Path, str]]:
    """(weights file, description) for a model name whose trained weights ship with tome_deploy; else None."""
    if name == ARCH and ASSET_WEIGHTS.is_file():
        return ASSET_WEIGHTS, BUNDLED_WEIGHTS_LABEL
    return None


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


def _split_indices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [1797, 8, 8] float, labels [1797] int64, train indices, test indices)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    labels = np.asarray(digits.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=SPLIT["test_size"], stratify=labels, random_state=SPLIT["random_state"]
    )
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32))
    return images, torch.from_numpy(labels), torch.from_numpy(train_idx), torch.from_numpy(test_idx)


def split_fingerprint() -> str:
    """sha256 of the sorted test indices: changes if scikit-learn ever splits differently."""
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


def _random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each 8x8 digit by up to `max_shift` pixels in each direction (zero fill): [B, 8, 8] -> [B, 8, 8]."""
    batch, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (batch,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (batch,), generator=generator)
    rows = (dy[:, None] + torch.arange(height)[None, :])[:, :, None]  # [B, H, 1]
    cols = (dx[:, None] + torch.arange(width)[None, :])[:, None, :]  # [B, 1, W]
    return padded[torch.arange(batch)[:, None, None], rows, cols]


# ----------------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    label_smoothing: float = 0.0
    drop_path_rate: float = 0.0
    max_shift: int = 1  # random shifts of the 8x8 digit, in original pixels (= whole 4x4 patches)
    train_limit: Optional[int] = None  # train on the first N images of the (fixed) training split only

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels for the duration of training; the caller's settings are restored afterwards."""
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def sincos_position_embedding(grid: int, dim: int) -> torch.Tensor:
    """2-D sine-cosine position codes [grid * grid, dim] (row-major): half the channels encode the row,
    half the column, each as sines and cosines at geometrically spaced frequencies."""
    if dim % 4:
        raise ValueError(f"embed dim {dim} must be a multiple of 4")
    quarter = dim // 4
    frequencies = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    coords = torch.arange(grid, dtype=torch.float64)

    def encode(values: torch.Tensor) -> torch.Tensor:
        angles = values[:, None] * frequencies[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # [grid*grid, dim/2]

    rows = coords.repeat_interleave(grid)
    cols = coords.repeat(grid)
    return torch.cat([encode(rows), encode(cols)], dim=1).to(torch.float32)


def build_model(seed: int = 0, drop_path_rate: float = 0.0) -> VisionTransformer:
    """A freshly initialised `tome_digits_vit` (seeded; the caller's RNG state is left alone).

    Each patch here is one grey pixel, so a token's content is a single intensity and where it sits is
    known only from its position embedding; timm's tiny random init (std 0.02) would be drowned by the
    patch projection, so the (still learned) position embedding starts from 2-D sine-cosine codes.
    """
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(ARCH, pretrained=False, drop_path_rate=drop_path_rate)
    grid = model.patch_embed.grid_size[0]
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, prefix:] = sincos_position_embedding(grid, model.embed_dim)
    return model


@torch.inference_mode()
def evaluate(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of `model` in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(pixels[start:start + batch_size])
        correct += int((logits.argmax(dim=-1) == labels[start:start + batch_size]).sum())
    model.train(was_training)
    return correct / len(labels)


def train(seed: int = 0, config: TrainConfig = TrainConfig(),
          log: Optional[Callable[[str], None]] = None) -> tuple[VisionTransformer, float]:
    """Train `tome_digits_vit` from scratch on the fixed training split -> (model in eval mode, test accuracy).

    Same seed and config, same weights (deterministic algorithms, seeded init, shuffling and augmentation;
    bit-identical across runs on one machine and thread count). Global RNG and determinism settings are
    restored on return.
    """
    images, labels = digits_train_set()
    if config.train_limit is not None:
        images, labels = images[:config.train_limit], labels[:config.train_limit]
    test_pixels, test_labels = digits_test_set()
    generator = torch.Generator().manual_seed(seed)

    with _deterministic(), torch.random.fork_rng(devices=[]):
        model = build_model(seed, drop_path_rate=config.drop_path_rate)
        torch.manual_seed(seed + 1)  # drop-path masks draw from the global RNG
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "pos_embed" in n]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=(0.9, 0.999), foreach=False,
        )
        steps_per_epoch = math.ceil(len(labels) / config.batch_size)
        total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
        step, start = 0, time.perf_counter()
        model.train()
        for epoch in range(config.epochs):
            order = torch.randperm(len(labels), generator=generator)
            running = 0.0
            for first in range(0, len(order), config.batch_size):
                batch = order[first:first + config.batch_size]
                digits = images[batch]
                if config.max_shift > 0:
                    digits = _random_shift(digits, generator, config.max_shift)
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, total, warmup, config.lr)
                loss = F.cross_entropy(model(pixels_from_digits(digits)), labels[batch],
                                       label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += float(loss.detach()) * len(batch)
                step += 1
            if log is not None:
                log(f"epoch {epoch + 1:>3}/{config.epochs}  loss {running / len(labels):.4f}  "
                    f"{time.perf_counter() - start:6.1f} s")
        model.eval()
    accuracy = evaluate(model, test_pixels, test_labels)
    # Training-only settings leave no trace in the weights; hand back the plain architecture.
    final = build_model(seed)
    final.load_state_dict(model.state_dict(), strict=True)
    return final.eval(), accuracy


# ----------------------------------------------------------------------------------------------------------
# Committed weights


def save_digits_vit(model: nn.Module, accuracy: float, seed: int, config: TrainConfig,
                    weights: Path = ASSET_WEIGHTS, record: Path = ASSET_JSON, extra: Optional[dict] = None) -> dict:
    """Write the weights (safetensors with arch/accuracy/seed/split metadata) and the JSON record."""
    from safetensors.torch import save_file

    from .loading import weights_fingerprint

    test_pixels, test_labels = digits_test_set()
    correct = round(accuracy * len(test_labels))
    info = {
        "arch": ARCH,
        "model_args": MODEL_ARGS,
        "test_accuracy": accuracy,
        "test_correct": correct,
        "test_size": len(test_labels),
        "train_size": len(digits_train_set()[1]) if config.train_limit is None else config.train_limit,
        "seed": seed,
        "split": dict(SPLIT, test_indices_sha256=split_fingerprint()),
        "train_config": config.to_dict(),
        "weights_sha256": weights_fingerprint(model),
        "versions": {"torch": torch.__version__, "timm": _timm_version()},
        **(extra or {}),
    }
    state = {name: tensor.detach().contiguous().clone() for name, tensor in model.state_dict().items()}
    metadata = {
        "arch": ARCH,
        "model_args": json.dumps(MODEL_ARGS, sort_keys=True),
        "accuracy": f"{accuracy:.6f}",
        "seed": str(seed),
        "split": json.dumps(info["split"], sort_keys=True),
        "format": "pt",
    }
    weights.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(weights), metadata=metadata)
    weights.chmod(0o644)  # safetensors creates the file owner-only; it is a shipped asset
    record.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def load_digits_vit(weights: Path | str = ASSET_WEIGHTS) -> VisionTransformer:
    """The committed trained model (eval mode)."""
    from safetensors.torch import load_file

    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"no trained digits weights at {path}; run python benchmarks/train_digits_vit.py")
    model = build_model(0)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


def recorded_accuracy(record: Path = ASSET_JSON) -> float:
    """The test accuracy the training run recorded next to the committed weights (a fraction)."""
    return float(json.loads(Path(record).read_text())["test_accuracy"])


def _timm_version() -> str:
    import timm

    return timm.__version__
