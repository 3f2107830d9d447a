"""Where a model comes from: one object for the name or path and the options that go with it, checked once."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

from tome_deploy.errors import InvalidInputError
from tome_deploy.models.loading.checkpoint import check_img_size_value

MAX_SEED = 2**64 - 1  # torch.manual_seed takes an unsigned 64-bit seed

def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise InvalidInputError(f"--seed must be an integer from 0 to {MAX_SEED} (2**64 - 1), got {seed!r}")


@dataclass(frozen=True)
class ModelSource:
    """name: a timm model name or a checkpoint / pickled-module path. arch: the timm architecture of a
    state-dict file without an 'arch' key. checkpoint: weights for a model name. img_size: the input
    resolution (None: the model's). seed: of the random init when no weights are given."""

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

    def at_img_size(self, img_size: Optional[int]) -> "ModelSource":
        """The same source at another input resolution."""
        return ModelSource(self.name, self.arch, self.checkpoint, self.pretrained, img_size, self.trust_pickle, self.seed)
