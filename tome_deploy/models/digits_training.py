"""Training of the bundled digits ViT (`tome_digits_vit`): seeded init, shuffling and augmentation,
deterministic kernels, and writing the weights and the digits data to tome_deploy/assets. Used by
benchmarks/train_digits_vit.py and the tests; export and validation never import it.

Only `digits_data_from_sklearn` (deriving tome_deploy/assets/digits.npz again) needs scikit-learn, the
`digits` extra; training reads the shipped data."""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tome_deploy.errors import MissingDependencyError
from tome_deploy.models.digits import (
    ARCH,
    ASSET_DATA,
    ASSET_JSON,
    ASSET_WEIGHTS,
    MODEL_ARGS,
    SPLIT,
    digits_test_set,
    digits_train_set,
    evaluate,
    pixels_from_digits,
    split_fingerprint,
)

DIGITS_EXTRA = "pip install 'tome-deploy[digits]' (or pip install scikit-learn)"


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


def train(
    seed: int = 0, config: TrainConfig = TrainConfig(), log: Optional[Callable[[str], None]] = None
) -> tuple[VisionTransformer, float]:
    """Train `tome_digits_vit` from scratch on the fixed training split -> (model in eval mode, test accuracy).

    Same seed and config, same weights (deterministic algorithms, seeded init, shuffling and augmentation;
    bit-identical across runs on one machine and thread count). Global RNG and determinism settings are
    restored on return.
    """
    images, labels = digits_train_set()
    if config.train_limit is not None:
        images, labels = images[: config.train_limit], labels[: config.train_limit]
    test_pixels, test_labels = digits_test_set()
    generator = torch.Generator().manual_seed(seed)

    with _deterministic(), torch.random.fork_rng(devices=[]):
        model = build_model(seed, drop_path_rate=config.drop_path_rate)
        torch.manual_seed(seed + 1)  # drop-path masks draw from the global RNG
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "pos_embed" in n]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
            betas=(0.9, 0.999),
            foreach=False,
        )
        steps_per_epoch = math.ceil(len(labels) / config.batch_size)
        total, warmup = config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
        step, start = 0, time.perf_counter()
        model.train()
        for epoch in range(config.epochs):
            order = torch.randperm(len(labels), generator=generator)
            running = 0.0
            for first in range(0, len(order), config.batch_size):
                batch = order[first : first + config.batch_size]
                digits = images[batch]
                if config.max_shift > 0:
                    digits = _random_shift(digits, generator, config.max_shift)
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, total, warmup, config.lr)
                loss = F.cross_entropy(
                    model(pixels_from_digits(digits)), labels[batch], label_smoothing=config.label_smoothing
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += float(loss.detach()) * len(batch)
                step += 1
            if log is not None:
                log(
                    f"epoch {epoch + 1:>3}/{config.epochs}  loss {running / len(labels):.4f}  "
                    f"{time.perf_counter() - start:6.1f} s"
                )
        model.eval()
    accuracy = evaluate(model, test_pixels, test_labels)
    # Training-only settings leave no trace in the weights; hand back the plain architecture.
    final = build_model(seed)
    final.load_state_dict(model.state_dict(), strict=True)
    return final.eval(), accuracy


# ----------------------------------------------------------------------------------------------------------
# Committed weights


def save_digits_vit(
    model: nn.Module,
    accuracy: float,
    seed: int,
    config: TrainConfig,
    weights: Path = ASSET_WEIGHTS,
    record: Path = ASSET_JSON,
    extra: Optional[dict] = None,
) -> dict:
    """Write the weights (safetensors with arch/accuracy/seed/split metadata) and the JSON record."""
    from safetensors.torch import save_file

    from tome_deploy.models.loading.fingerprint import weights_fingerprint

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


def _timm_version() -> str:
    import timm

    return timm.__version__


# ----------------------------------------------------------------------------------------------------------
# Shipped data


def digits_data_from_sklearn() -> dict[str, np.ndarray]:
    """The arrays of tome_deploy/assets/digits.npz, derived again: scikit-learn's `load_digits()` and the
    `train_test_split` that SPLIT describes (indices in the order it returns them)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:
        raise MissingDependencyError(f"deriving the digits data needs scikit-learn: {DIGITS_EXTRA}") from err

    digits = load_digits()
    labels = np.asarray(digits.target)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=SPLIT["test_size"], stratify=labels, random_state=SPLIT["random_state"]
    )
    return {
        "images": np.asarray(digits.images).astype(np.uint8),
        "labels": labels.astype(np.uint8),
        "train_indices": train_idx.astype(np.int16),
        "test_indices": test_idx.astype(np.int16),
    }


def write_digits_data(path: Path = ASSET_DATA) -> None:
    """Write `digits_data_from_sklearn()` as a compressed .npz (what ships as tome_deploy/assets/digits.npz)."""
    np.savez_compressed(path, **digits_data_from_sklearn())
    path.chmod(0o644)
