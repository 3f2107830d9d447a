"""Hugging Face transformers 5.x video classifiers: VideoMAE and ViViT, clips of `[T, 3, H, W]` frames.

- `VideoMAEForVideoClassification` / `VideoMAEModel`: a tubelet embedding (a Conv3d over `tubelet_size` frames
  and a `patch_size` square), a fixed sin-cos position table, no prefix token, pre-norm layers. The classifier
  pools the plain mean of the final tokens, then `fc_norm` and the linear head (`use_mean_pooling`); with ToMe
  that is the plain mean of the merged tokens, each counted once whatever its size, as for every family's
  mean pooling (docs/model-families.md). `VideoMAEModel` exports that same mean of its `last_hidden_state`.
- `VivitForVideoClassification` / `VivitModel`: transformers builds ViViT's unfactorised spatio-temporal model,
  a plain pre-norm ViT over tubelets with a class token (prefix 1, never merged); the class head (or
  `VivitModel`'s pooler) reads the class token.

Refused: TimeSformer (divided space-time attention: each block attends over time within every patch position,
then over space within every frame, on a token layout of whole frames times whole grids that merging breaks),
and a VideoMAE classifier without mean pooling (its head reads token 0, which is a patch token, not a class
token, and merging reorders tokens).

Attention runs through our own function on each layer's projections, with proportional attention. Sources: a
local `save_pretrained` folder whose config.json names one of these classes, loaded through
hf_transformers.load_hf (no custom code, weights checked against config.json before anything is built).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tome_deploy.artifact.formulations import MergeFormulation
from tome_deploy.artifact.input_spec import InputSpec
from tome_deploy.artifact.spec import EXPORT_SPEC
from tome_deploy.core.attention import scaled_attention
from tome_deploy.core.merge import proportional_attention_bias
from tome_deploy.errors import ModelLoadError, UnsupportedModelError
from tome_deploy.models.adapter import mlp_width_ratio
from tome_deploy.models.blocks import PreNormToMeBlock
from tome_deploy.models.loading.source import LoadedModel, ModelSource, SourceForm

# model class -> the output exported ("mean" is the plain mean of last_hidden_state over its tokens)
OUTPUTS = {
    "VideoMAEForVideoClassification": "logits",
    "VideoMAEModel": "mean",
    "VivitForVideoClassification": "logits",
    "VivitModel": "pooler_output",
}

_TIMESFORMER_WHY = (
    "uses divided space-time attention (each block attends over time per patch position, then over space per "
    "frame, on a fixed frames x patches layout that merging tokens would break)"
)
# model class -> why ToMe refuses it
REFUSED = {
    "TimesformerForVideoClassification": _TIMESFORMER_WHY,
    "TimesformerModel": _TIMESFORMER_WHY,
}

# model_type -> the video processor's defaults: (mean, std, interpolation, crop_pct, rescale_factor, offset).
# Pixels are rescaled (x * rescale_factor - offset) and then normalised ((x - mean) / std).
_HALF = (0.5, 0.5, 0.5)
DEFAULT_PREPROCESS = {
    "videomae": (_HALF, _HALF, "bilinear", 1.0, 1 / 255, False),  # shortest edge 224, crop 224
    "vivit": (_HALF, _HALF, "bilinear", 224 / 256, 1 / 127.5, True),  # shortest edge 256, crop 224; [-1, 1]
}


class HFVideoModel(nn.Module):
    """A transformers video model with one exported output: pixel_values [B, T, 3, H, W] -> [B, ...]."""

    def __init__(self, hf_model: nn.Module, preprocess: Optional[dict] = None):
        super().__init__()
        name = type(hf_model).__name__
        if name in REFUSED:
            raise UnsupportedModelError(f"ToMe cannot rewrite {name}: it {REFUSED[name]}")
        if name not in OUTPUTS:
            raise UnsupportedModelError(
                f"{name} is not a transformers video class ToMe supports; supported: {', '.join(sorted(OUTPUTS))}"
            )
        self.hf = hf_model
        self.output = OUTPUTS[name]
        self.preprocess = preprocess  # from preprocessor_config.json, when the folder had one
        frame_preprocessing(hf_model.config.model_type, preprocess)  # a bad processor value fails the load, here

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values: [B, T, 3, H, W] -> logits [B, classes] or an embedding [B, C]."""
        out = self.hf(pixel_values=pixel_values)
        if self.output == "mean":
            return out.last_hidden_state.mean(dim=1)  # [B, C]: every final token counted once
        value = getattr(out, self.output)
        if value is None:
            raise UnsupportedModelError(f"{type(self.hf).__name__} returns no {self.output} (built without a pooler?)")
        return value


def _base(model: HFVideoModel) -> nn.Module:
    """The encoder model inside: VideoMAEModel or VivitModel."""
    return getattr(model.hf, "videomae", None) or getattr(model.hf, "vivit", None) or model.hf


def _is_videomae(model: HFVideoModel) -> bool:
    return model.hf.config.model_type == "videomae"


def _layer_parent(model: HFVideoModel) -> tuple[nn.Module, str]:
    """(the module holding the layer list, its attribute): VideoMAE's encoder.layer, ViViT's layers."""
    base = _base(model)
    return (base.encoder, "layer") if _is_videomae(model) else (base, "layers")


def videomae_tome_attention(
    attn: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """VideoMAE's self-attention (VideoMAEAttention: query / key / value, where the key has no bias, then
    output.dense) with proportional attention. x: [B, N, C], size: [B, N, 1] or None ->
    (out [B, N, C] before the output dropout, keys [B, H, N, hd])."""
    self_attn = attn.attention
    batch, tokens, _ = x.shape
    hd = self_attn.attention_head_size
    q, k, v = (
        proj(x).reshape(batch, tokens, -1, hd).transpose(1, 2)
        for proj in (self_attn.query, self_attn.key, self_attn.value)
    )  # [B, H, N, hd]
    bias = None if size is None else proportional_attention_bias(size).to(q.dtype)  # [B, 1, 1, N]
    dropout = float(self_attn.dropout_prob) if attn.training else 0.0
    out = scaled_attention(q, k, v, bias, self_attn.scaling, dropout)  # [B, H, N, hd]
    return attn.output.dense(out.transpose(1, 2).reshape(batch, tokens, -1)), k


def _videomae_mlp(layer: nn.Module) -> nn.Module:
    """VideoMAE's MLP: intermediate (dense + activation) then output.dense; output's residual add is the block's."""
    return nn.Sequential(layer.intermediate, layer.output.dense)


class HFVideoAdapter:
    family = "Hugging Face transformers video (VideoMAE, ViViT)"

    def accepts(self, model: nn.Module) -> bool:
        return isinstance(model, HFVideoModel)

    def check_supported(self, model: nn.Module) -> None:
        name, config = type(model.hf).__name__, model.hf.config
        if name == "VideoMAEForVideoClassification" and not config.use_mean_pooling:
            raise UnsupportedModelError(
                f"{name} with use_mean_pooling false classifies token 0, a patch token (VideoMAE has no class "
                "token) that merging moves; ToMe supports the mean-pooling head (use_mean_pooling true)"
            )
        expected = "VideoMAELayer" if _is_videomae(model) else "VivitLayer"
        for i, layer in enumerate(self.blocks(model)):
            if type(layer).__name__ != expected:
                raise UnsupportedModelError(
                    f"layer {i} of {name} is {type(layer).__name__}; ToMe supports {expected} here"
                )

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        parent, attr = _layer_parent(model)
        return list(getattr(parent, attr))

    def tome_block(self, block: nn.Module, r: int, num_prefix: int, formulation: MergeFormulation) -> nn.Module:
        if type(block).__name__ == "VideoMAELayer":
            attention, after_attn = videomae_tome_attention, [block.attention.output.dropout]
            mlp, after_mlp = _videomae_mlp(block), [block.output.dropout]
        else:  # VivitLayer: ViT's layout with q/k/v/o projections
            from tome_deploy.models.hf_transformers import hf_tome_attention

            attention, after_attn, mlp, after_mlp = hf_tome_attention, [block.dropout], block.mlp, [block.dropout]
        return PreNormToMeBlock(
            attention,
            block.layernorm_before,
            block.attention,
            after_attn,
            block.layernorm_after,
            mlp,
            after_mlp,
            r,
            num_prefix,
            formulation,
        )

    def install(self, model: nn.Module, blocks: nn.Module) -> None:
        from tome_deploy.models.hf_transformers import _LayersCall

        parent, attr = _layer_parent(model)
        setattr(parent, attr, nn.ModuleList([_LayersCall(blocks)]))

    def embed(self, model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """inputs: pixel_values [B, T, 3, H, W] -> (tokens entering the first layer [B, N0, C], None)."""
        embeddings = _base(model).embeddings
        return (embeddings(inputs, None) if _is_videomae(model) else embeddings(inputs)), None

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0 if _is_videomae(model) else 1

    def grid_size(self, model: nn.Module) -> tuple[int, ...]:
        """(time steps, rows, columns) of the tubelet tokens, in their order: frames over the tubelet's depth, then
        the patch grid of one frame."""
        config = model.hf.config
        image = config.image_size
        height, width = (image, image) if isinstance(image, int) else tuple(image)
        if _is_videomae(model):
            depth, patch_h, patch_w = config.tubelet_size, config.patch_size, config.patch_size
        else:
            depth, patch_h, patch_w = config.tubelet_size
        return config.num_frames // depth, height // patch_h, width // patch_w

    def tokens_at_input(self, model: nn.Module) -> int:
        return math.prod(self.grid_size(model)) + self.num_prefix_tokens(model)

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.hf.config.hidden_size)

    def mlp_ratio(self, model: nn.Module) -> float:
        layer = self.blocks(model)[0]
        mlp = _videomae_mlp(layer) if _is_videomae(model) else layer.mlp
        return mlp_width_ratio(mlp, self.embed_dim(model))

    def input_spec(self, model: nn.Module) -> InputSpec:
        """kind "video", shape [T, C, H, W], the frames' preprocessing (docs/model-families.md)."""
        config = model.hf.config
        image = config.image_size
        height, width = (image, image) if isinstance(image, int) else tuple(image)
        preprocessing = {**frame_preprocessing(config.model_type, model.preprocess), "sampling": "uniform"}
        return InputSpec.from_dict(
            {
                "kind": "video",
                "name": EXPORT_SPEC.input_name,
                "shape": [int(config.num_frames), int(config.num_channels), int(height), int(width)],
                "preprocessing": preprocessing,
            }
        )

    def output_kind(self, model: nn.Module) -> str:
        return "logits" if model.output == "logits" else "embedding"


ADAPTER = HFVideoAdapter()


def frame_preprocessing(model_type: str, processor: Optional[dict]) -> dict[str, Any]:
    """mean, std, interpolation and crop_pct of each frame, for pixels scaled to [0, 1] as every input spec
    takes them. The processor rescales x * rescale_factor - offset before it normalises (ViViT maps to [-1, 1]);
    both steps fold into one mean and std on [0, 1] pixels: mean' = (offset + mean) / (255 rescale_factor),
    std' = std / (255 rescale_factor). processor: preprocessor_config.json as hf_transformers read it."""
    from tome_deploy.models.hf_transformers import _PIL_RESAMPLE

    mean, std, interpolation, crop_pct, rescale, offset = DEFAULT_PREPROCESS[model_type]
    cfg = processor or {}
    mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    interpolation = _PIL_RESAMPLE.get(cfg.get("resample"), interpolation)
    crop_pct = cfg.get("tome_crop_pct", crop_pct)
    rescale = _processor_value(cfg, "rescale_factor", rescale, _positive_number)
    offset = _processor_value(cfg, "offset", offset, _boolean)
    if not _processor_value(cfg, "do_rescale", True, _boolean):
        rescale = 1.0
    if not _processor_value(cfg, "do_normalize", True, _boolean):
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    unit = 255.0 * rescale  # the processor's value of a [0, 1] pixel of 1.0, before the offset
    return {
        "mean": [(float(offset) + float(m)) / unit for m in mean],
        "std": [float(s) / unit for s in std],
        "interpolation": str(interpolation),
        "crop_pct": float(crop_pct),
    }


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _boolean(value: Any) -> bool:
    return isinstance(value, bool)


def _processor_value(cfg: dict, key: str, default: Any, valid: Any) -> Any:
    """cfg[key] when present and valid, the default when absent; ModelLoadError naming the key otherwise."""
    value = cfg.get(key, default)
    if not valid(value):
        raise ModelLoadError(
            f"the model folder's preprocessor_config.json has {key} {value!r}; it must be "
            f"{'a positive finite number' if valid is _positive_number else 'true or false'} (fix or delete the file)"
        )
    return value


def _architecture(folder: Path) -> Optional[str]:
    """The first class config.json's `architectures` names, or None when the file is unreadable or names none."""
    from tome_deploy.models.hf_transformers import MAX_CONFIG_BYTES, read_json_object

    try:
        config = read_json_object(folder / "config.json", MAX_CONFIG_BYTES, "model config")
    except ModelLoadError:
        return None  # the image form claims it and says what is wrong with the file
    architectures = config.get("architectures")
    first = architectures[0] if isinstance(architectures, list) and architectures else None
    return first if isinstance(first, str) else None


def read_preprocessing(folder: Optional[Path], config: Any) -> Optional[dict]:
    """The folder's preprocessor_config.json (size-capped and type-checked by the image loader's reader), or
    None; read before the model is built (hf_transformers.load_hf calls this)."""
    from tome_deploy.models.hf_transformers import processor_config

    return processor_config(folder) if folder is not None else None


def wrap(hf_model: nn.Module, preprocess: Optional[dict]) -> HFVideoModel:
    """The model ToMe sees for a loaded video class (hf_transformers.load_hf calls this)."""
    return HFVideoModel(hf_model, preprocess)


def claims(source: ModelSource) -> bool:
    """A save_pretrained folder whose config.json names a video class (supported or refused)."""
    folder = Path(source.name).expanduser()
    return folder.is_dir() and (folder / "config.json").is_file() and _architecture(folder) in {*OUTPUTS, *REFUSED}


def load_source(source: ModelSource) -> LoadedModel:
    """A claimed folder as a LoadedModel at the frame size and frame count its config.json gives: the refused
    classes named with the reason, the others loaded as every Hugging Face folder is."""
    from tome_deploy.models import hf_transformers

    arch = _architecture(Path(source.name).expanduser())
    if arch in REFUSED:
        raise UnsupportedModelError(f"{source.name} is a {arch}, which ToMe cannot rewrite: it {REFUSED[arch]}")
    return hf_transformers.load_source(source)


SOURCE_FORM = SourceForm("save_pretrained folder of a video model", claims, load_source)
