"""The model-adapter seam: the few facts and operations ToMe needs from one model family.

`apply_tome` (models/patch.py), the FLOP count, the export metadata and tome-visualize talk to a model only
through a `ModelAdapter`; one module per family implements it (models/timm_vit.py is the first). To add a
family, write a module with an adapter object and list it in `_FAMILY_MODULES`.

What a family provides:
- which modules are its transformer blocks, and a ToMe version of one block (attention with the additive
  key bias log(size) of proportional attention, returning the keys, then the merge, then the MLP);
- how the ToMe blocks are put into a copy of the model (`install`), so that the model's own forward (stem,
  prefix tokens, head and its pooling) runs around them unchanged;
- the token counts (tokens at the first block, prefix tokens that never merge), the width and real MLP
  width (FLOP model), the patch grid (tome-visualize), the input spec: the input's kind, name, whole static
  shape and preprocessing (export metadata, probes, serving).
"""

from __future__ import annotations

import importlib
from typing import Any, Optional, Protocol, Sequence

import torch
from torch import nn

from tome_deploy.artifact.checks import FieldError
from tome_deploy.artifact.formulations import MergeFormulation
from tome_deploy.artifact.input_spec import InputSpec
from tome_deploy.artifact.metadata import MetadataError
from tome_deploy.core.schedule import ModelShape
from tome_deploy.errors import UnsupportedModelError


class ModelAdapter(Protocol):
    family: str  # one human name, e.g. "timm VisionTransformer"

    def accepts(self, model: nn.Module) -> bool:
        """True when `model` belongs to this family (its class); `check_supported` then judges the details."""

    def check_supported(self, model: nn.Module) -> None:
        """Raise UnsupportedModelError (one line: the class and why) unless ToMe can rewrite `model` exactly."""

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks, in order."""

    def tome_block(self, block: nn.Module, r: int, num_prefix: int, formulation: MergeFormulation) -> nn.Module:
        """A block that runs (x [B, N, C], size [B, N, 1] or None, source [B, N, N0] or None, context)
        -> (x [B, N - r, C], size, source, context), reusing `block`'s layers."""

    def install(self, model: nn.Module, blocks: nn.Module) -> None:
        """Put `blocks` (a ToMeBlocks) in place of the model's blocks, in a deep copy the caller owns."""

    def embed(self, model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The model's input [B, *input_spec(model).shape] -> (tokens entering the first block [B, N0, C], block
        context or None). Per kind of input: image pixels [B, C, H, W]; video frames [B, T, C, H, W]; audio, the
        normalised log-mel spectrogram [B, time, mel]."""

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens at the front that never merge (class, distillation, registers)."""

    def tokens_at_input(self, model: nn.Module) -> int:
        """Patch plus prefix tokens the first block sees."""

    def grid_size(self, model: nn.Module) -> tuple[int, ...]:
        """The patch grid, one entry per axis the patches tile, in the order the tokens are laid out: (rows,
        columns) for an image; for video and audio, what the family's patching gives (e.g. (time steps, rows,
        columns) of tubelets)."""

    def embed_dim(self, model: nn.Module) -> int:
        """C, the width of the tokens."""

    def mlp_ratio(self, model: nn.Module) -> float:
        """The MLP's real width as the FLOP rule's ratio (its weights over 2 C^2)."""

    def input_spec(self, model: nn.Module) -> InputSpec:
        """What the model takes in and how a client prepares it (artifact/input_spec.py): the kind, the input's
        name in the exported graph, one sample's whole static shape and the preprocessing the export records."""

    def output_kind(self, model: nn.Module) -> str:
        """ "logits" for a classifier, "embedding" for an encoder: which quality metrics compare its outputs."""


_FAMILY_MODULES = (
    "tome_deploy.models.timm_vit",
    "tome_deploy.models.timm_eva",
    "tome_deploy.models.hf_transformers",
    "tome_deploy.models.hf_video",
    "tome_deploy.models.hf_audio",
    "tome_deploy.models.open_clip_visual",
    "tome_deploy.models.torchvision_vit",
)


def family_adapters() -> list[ModelAdapter]:
    """Every family's adapter, imported on first use (a family's library is imported only by its module)."""
    return [importlib.import_module(name).ADAPTER for name in _FAMILY_MODULES]


def find_adapter(model: nn.Module) -> Optional[ModelAdapter]:
    return next((adapter for adapter in family_adapters() if adapter.accepts(model)), None)


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of `model`'s family, after its support check; UnsupportedModelError when none fits."""
    adapter = find_adapter(model)
    if adapter is None:
        families = ", ".join(a.family for a in family_adapters())
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a model family ToMe can rewrite; supported: {families}"
        )
    adapter.check_supported(model)
    return adapter


def checked_input_spec(adapter: ModelAdapter, model: nn.Module, name: str) -> InputSpec:
    """`adapter.input_spec(model)`, whose values are checked as an artifact's reader checks `tome.input`: a
    preprocessing that reader refuses (a std of 0 or NaN, a mean of 1e6, a crop of 1/8) is a MetadataError
    naming `name` (the model), before anything is exported, drawn or tuned."""
    try:
        return adapter.input_spec(model)
    except FieldError as err:
        raise refused_metadata(name, f"tome.input {err}") from None


def refused_metadata(name: str, problem: str) -> MetadataError:
    """The one line for a model (`name`) whose export would carry metadata the artifact reader refuses."""
    return MetadataError(
        f"{name} would be exported with metadata that tome-serve refuses: {problem}; fix the model's "
        "preprocessing (a Hugging Face folder's preprocessor_config.json, a timm model's pretrained_cfg) or its config"
    )


def describe(adapter: ModelAdapter, model: nn.Module) -> ModelShape:
    """`model`'s shape, read through its family's adapter."""
    return ModelShape(
        tokens=adapter.tokens_at_input(model),
        depth=len(adapter.blocks(model)),
        num_prefix=adapter.num_prefix_tokens(model),
        width=adapter.embed_dim(model),
        mlp_ratio=adapter.mlp_ratio(model),
        grid=tuple(adapter.grid_size(model)),
    )


def mlp_width_ratio(mlp: nn.Module, dim: int) -> float:
    """Weights of every Linear in `mlp` over 2 C^2: 4.0 for a C -> 4C -> C MLP, its real ratio otherwise
    (SwiGLU's three matrices, hidden widths that are not 4C)."""
    weights = sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear))
    return weights / (2 * int(dim) ** 2)
