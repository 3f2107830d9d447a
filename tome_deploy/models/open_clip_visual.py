"""OpenCLIP image towers (`open_clip.create_model(arch).visual`, an open_clip.transformer.VisionTransformer):
ResidualAttentionBlocks on nn.MultiheadAttention, ln_pre, optional LayerScale, class-token / average /
attention pooling, ln_post and the projection. The export is the image encoder (image embedding out);
the text tower is not part of it.

Sources: `open_clip:<arch>` (random weights, seeded) or `open_clip:<arch> --checkpoint PATH` (a CLIP
state dict, read safely: safetensors or torch.load(weights_only=True); `visual.*` keys or the tower's own).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tome_deploy.artifact.formulations import MergeFormulation
from tome_deploy.artifact.input_spec import InputSpec, image_spec
from tome_deploy.artifact.spec import EXPORT_SPEC
from tome_deploy.core.attention import scaled_attention
from tome_deploy.core.merge import proportional_attention_bias
from tome_deploy.errors import (
    InvalidInputError,
    MissingDependencyError,
    ModelLoadError,
    UnsupportedModelError,
    error_reason,
)
from tome_deploy.models.adapter import adapter_for, mlp_width_ratio
from tome_deploy.models.blocks import PreNormToMeBlock
from tome_deploy.models.loading.checkpoint import existing_checkpoint, read_state_dict
from tome_deploy.models.loading.source import LoadedModel, ModelSource, SourceForm

PREFIX = "open_clip:"


def _open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise MissingDependencyError(
            f"OpenCLIP models need open_clip_torch: pip install 'tome-deploy[families]' ({err})"
        ) from err
    return open_clip


def mha_tome_attention(
    attn: nn.MultiheadAttention, x: torch.Tensor, size: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """nn.MultiheadAttention (batch first, self-attention, packed in_proj) with proportional attention.

    x: [B, N, C], size: [B, N, 1] or None -> (out [B, N, C], keys [B, H, N, hd]).
    """
    batch, tokens, dim = x.shape
    heads = attn.num_heads
    q, k, v = (
        t.reshape(batch, tokens, heads, dim // heads).transpose(1, 2)
        for t in F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    )  # [B, H, N, hd]
    bias = None if size is None else proportional_attention_bias(size).to(q.dtype)  # [B, 1, 1, N]
    out = scaled_attention(q, k, v, bias, dropout=attn.dropout if attn.training else 0.0)  # [B, H, N, hd]
    return attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, dim)), k


class _TransformerCall(nn.Module):
    """Stands where visual.transformer was: `transformer(x, attn_mask=None)` on batch-first tokens."""

    def __init__(self, blocks: nn.Module):
        super().__init__()
        self.tome_blocks = blocks

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.tome_blocks(x)


class OpenClipAdapter:
    family = "OpenCLIP VisionTransformer image towers"

    def accepts(self, model: nn.Module) -> bool:
        try:
            from open_clip.transformer import VisionTransformer
        except ImportError:
            return False
        return isinstance(model, VisionTransformer)

    def check_supported(self, model: nn.Module) -> None:
        from open_clip.transformer import ResidualAttentionBlock

        if not getattr(model.transformer, "batch_first", False):
            raise UnsupportedModelError(
                "this OpenCLIP tower runs its transformer sequence-first; ToMe supports batch_first towers (open_clip >= 2.22)"
            )
        if getattr(model, "output_tokens", False):
            raise UnsupportedModelError(
                "the OpenCLIP tower returns its tokens (output_tokens=True); ToMe exports the pooled image embedding only"
            )
        for i, block in enumerate(model.transformer.resblocks):
            attn = getattr(block, "attn", None)
            if (
                type(block) is not ResidualAttentionBlock
                or not isinstance(attn, nn.MultiheadAttention)
                or hasattr(block, "ln_1_kv")
            ):
                raise UnsupportedModelError(
                    f"block {i} of the OpenCLIP tower is {type(block).__name__}; ToMe supports ResidualAttentionBlock with nn.MultiheadAttention"
                )
            if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
                raise UnsupportedModelError(
                    f"block {i}'s nn.MultiheadAttention has separate q/k/v weights or extra key/value bias; ToMe supports the packed in_proj form"
                )

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer.resblocks)

    def tome_block(self, block: nn.Module, r: int, num_prefix: int, formulation: MergeFormulation) -> nn.Module:
        return PreNormToMeBlock(
            mha_tome_attention,
            block.ln_1,
            block.attn,
            [block.ls_1],
            block.ln_2,
            block.mlp,
            [block.ls_2],
            r,
            num_prefix,
            formulation,
        )

    def install(self, model: nn.Module, blocks: nn.Module) -> None:
        model.transformer = _TransformerCall(blocks)

    def embed(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return model._embeds(pixels), None

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1 if getattr(model, "class_embedding", None) is not None else 0

    def grid_size(self, model: nn.Module) -> tuple[int, int]:
        return tuple(int(v) for v in model.grid_size)

    def tokens_at_input(self, model: nn.Module) -> int:
        rows, cols = self.grid_size(model)
        return rows * cols + self.num_prefix_tokens(model)

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.conv1.out_channels)

    def mlp_ratio(self, model: nn.Module) -> float:
        mlp = next(m.mlp for m in model.modules() if isinstance(getattr(m, "mlp", None), nn.Module))
        return mlp_width_ratio(mlp, self.embed_dim(model))

    def input_spec(self, model: nn.Module) -> InputSpec:
        cfg = getattr(model, "preprocess_cfg", None) or {}
        height, width = (int(v) for v in model.image_size)
        return image_spec(
            EXPORT_SPEC.input_name,
            [int(model.conv1.in_channels), height, width],
            mean=[float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))],
            std=[float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))],
            interpolation=str(cfg.get("interpolation", "bicubic")),
            crop_pct=1.0,  # OpenCLIP resizes the shortest side to the input size, then center-crops
        )

    def output_kind(self, model: nn.Module) -> str:
        return "embedding"  # the image tower's embedding


ADAPTER = OpenClipAdapter()


def load_open_clip(name: str, *, checkpoint_state: Optional[dict], img_size: Optional[int], seed: int) -> nn.Module:
    """open_clip:<arch> -> its image tower (eval mode), random (seeded) or with `checkpoint_state` loaded."""
    open_clip = _open_clip()
    arch = name[len(PREFIX) :]
    if arch not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown OpenCLIP architecture {arch!r}; see open_clip.list_models() (e.g. open_clip:ViT-B-32)"
        )
    kwargs = {} if img_size is None else {"force_image_size": img_size}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        logging.disable(logging.WARNING)  # open_clip logs "no pretrained weights" on the root logger; we report it
        try:
            model = open_clip.create_model(arch, pretrained=None, **kwargs)
        except Exception as err:
            raise ModelLoadError(f"OpenCLIP could not create {arch}: {error_reason(err)}") from err
        finally:
            logging.disable(logging.NOTSET)
    visual = model.visual
    if checkpoint_state is not None:
        state = {k[len("visual.") :]: v for k, v in checkpoint_state.items() if k.startswith("visual.")} or dict(
            checkpoint_state
        )
        missing, unexpected = visual.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ModelLoadError(
                f"the checkpoint does not fit OpenCLIP {arch}'s image tower: {len(missing)} missing keys "
                f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); pass weights of the same architecture"
            )
    visual.preprocess_cfg = dict(open_clip.get_model_preprocess_cfg(model))
    return visual.eval()


def claims(source: ModelSource) -> bool:
    return source.name.startswith(PREFIX)


def load_source(source: ModelSource) -> LoadedModel:
    """`open_clip:<arch>`, random (seeded) or with --checkpoint's weights, as a LoadedModel."""
    name = source.name
    if source.pretrained:
        raise InvalidInputError(f"{name}: OpenCLIP weights are given with --checkpoint PATH (no hub is used)")
    if not source.checkpoint:
        visual = load_open_clip(name, checkpoint_state=None, img_size=source.img_size, seed=source.seed)
        return LoadedModel(
            visual,
            adapter_for(visual),
            name,
            f"random init (seed {source.seed}) — no pretrained weights",
            random_weights=True,
            seed=source.seed,
        )
    path = existing_checkpoint(source.checkpoint)
    state = read_state_dict(path, trust_pickle=source.trust_pickle)
    visual = load_open_clip(name, checkpoint_state=state, img_size=source.img_size, seed=source.seed)
    return LoadedModel(visual, adapter_for(visual), name, f"checkpoint {path.name}", random_weights=False, seed=None)


SOURCE_FORM = SourceForm("open_clip:<arch>", claims, load_source)
