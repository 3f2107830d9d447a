"""Where a model comes from (`ModelSource`, checked once), what loading it gave (`LoadedModel`), and the
record a family registers to load its own sources (`SourceForm`, listed in loading/dispatch.py)."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from tome_deploy.artifact.metadata import MAX_IMAGE_SIDE
from tome_deploy.errors import InvalidInputError
from tome_deploy.models.adapter import ModelAdapter

MAX_SEED = 2**64 - 1  # torch.manual_seed takes an unsigned 64-bit seed


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"--seed must be an integer from 0 to {MAX_SEED} (2**64 - 1), got {seed!r}")


def check_img_size_value(img_size: Optional[int]) -> None:
    if img_size is None:
        return
    try:
        valid = not isinstance(img_size, bool) and operator.index(img_size) == img_size
    except TypeError:
        valid = False
    if not valid:
        raise InvalidInputError(f"--img-size must be a positive integer, got {img_size!r}")
    if not 0 < img_size <= MAX_IMAGE_SIDE:
        raise InvalidInputError(
            f"--img-size must be a positive integer of at most {MAX_IMAGE_SIDE} (the largest image side an artifact "
            f"may declare), got {img_size}; pass a size from 1 to {MAX_IMAGE_SIDE}"
        )


@dataclass(frozen=True)
class ModelSource:
    """name: a timm model name, a checkpoint / pickled-module path, or another family's source (`hf:<id>`,
    a save_pretrained folder, `open_clip:<arch>`). arch: the timm architecture of a state-dict file
    without an 'arch' key. checkpoint: weights for a model name. img_size: the input resolution (None:
    the model's). seed: of the random init when no weights are given."""

    name: str
    arch: Optional[str] = None
    checkpoint: Optional[str] = None
    pretrained: bool = False
    img_size: Optional[int] = None
    trust_pickle: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", str(self.name))
        check_seed(self.seed)
        check_img_size_value(self.img_size)
        if self.img_size is not None:
            object.__setattr__(self, "img_size", operator.index(self.img_size))
        if self.pretrained and self.checkpoint:
            raise InvalidInputError("pass either --pretrained or --checkpoint PATH, not both")

    def at_img_size(self, img_size: Optional[int]) -> ModelSource:
        """The same source at another input resolution."""
        return ModelSource(
            self.name, self.arch, self.checkpoint, self.pretrained, img_size, self.trust_pickle, self.seed
        )


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # eval mode
    adapter: ModelAdapter  # its family's adapter, support already checked: pass it on instead of finding it again
    arch: Optional[str]  # timm architecture name when known
    weights: str  # one human line: where the weights came from; files by name only (it goes into artifacts)
    random_weights: bool
    seed: Optional[int]


@dataclass(frozen=True)
class SourceForm:
    """One way of naming a model, registered by the family module that loads it.

    claims: a cheap test of the source's name and options alone (string prefixes, file system checks);
    it imports no model library. load: the whole load of a claimed source (the family's library is
    imported there), returning the model in eval mode."""

    name: str  # e.g. "open_clip:<arch>"
    claims: Callable[[ModelSource], bool]
    load: Callable[[ModelSource], LoadedModel]
