"""Hugging Face transformers 5.x vision encoders: ViT, DeiT (with teacher), CLIP vision (with projection),
SigLIP vision, DINOv2 (with registers).

Attention runs through our own function on the module's q/k/v/output projections, so proportional
attention and the keys matching uses are exact whatever `attn_implementation` the model was loaded with. The
class, distillation and register tokens are prefix tokens (never merged); the model's own head runs as it
is (class-token / distillation heads, CLIP's post_layernorm + projection, SigLIP's attention-pooling head,
whose nn.MultiheadAttention is recomputed with the heads split per image so that it exports with static
shapes; the head sees every merged token once, not weighted by size).

The model ToMe sees is `HFImageModel`: the HF model plus the one output it exports (logits, image_embeds or
pooler_output), so that every runner gets one tensor. Sources: a local folder written by `save_pretrained`
(config.json + model.safetensors; safetensors only) or `hf:<id>` where a hub is reachable.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from pathlib import Path
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
from tome_deploy.input_files import read_input_bytes
from tome_deploy.models.adapter import adapter_for, checked_input_spec, mlp_width_ratio
from tome_deploy.models.blocks import PreNormToMeBlock
from tome_deploy.models.loading.source import LoadedModel, ModelSource, SourceForm

HUB_PREFIX = "hf:"

# model class -> the output exported
OUTPUTS = {
    "ViTForImageClassification": "logits",
    "ViTModel": "pooler_output",
    "DeiTForImageClassification": "logits",
    "DeiTForImageClassificationWithTeacher": "logits",
    "DeiTModel": "pooler_output",
    "CLIPVisionModel": "pooler_output",
    "CLIPVisionModelWithProjection": "image_embeds",
    "SiglipVisionModel": "pooler_output",
    "Dinov2Model": "pooler_output",
    "Dinov2WithRegistersModel": "pooler_output",
}

# transformers classes whose family has a module of its own: class name -> that module. It gives
# `read_preprocessing(folder or None, config)` (checked before anything is built) and `wrap(hf_model, preprocessing)`
# (the model ToMe sees); loading is this module's load_hf, with all its checks.
HF_FAMILY_MODULES = {
    "ASTForAudioClassification": "tome_deploy.models.hf_audio",
    "ASTModel": "tome_deploy.models.hf_audio",
    "VideoMAEForVideoClassification": "tome_deploy.models.hf_video",
    "VideoMAEModel": "tome_deploy.models.hf_video",
    "VivitForVideoClassification": "tome_deploy.models.hf_video",
    "VivitModel": "tome_deploy.models.hf_video",
}

# layer class -> (pre-attention norm, attention, after attention, pre-MLP norm, MLP, after MLP); "after"
# modules (dropout, layer scale, drop path) run in the order given.
LAYERS = {
    "ViTLayer": ("layernorm_before", "attention", ("dropout",), "layernorm_after", "mlp", ("dropout",)),
    "DeiTLayer": ("layernorm_before", "attention", ("dropout",), "layernorm_after", "mlp", ("dropout",)),
    "CLIPEncoderLayer": ("layer_norm1", "self_attn", (), "layer_norm2", "mlp", ()),
    "SiglipEncoderLayer": ("layer_norm1", "self_attn", (), "layer_norm2", "mlp", ()),
    "Dinov2Layer": ("norm1", "attention", ("layer_scale1", "drop_path"), "norm2", "mlp", ("layer_scale2", "drop_path")),
    "Dinov2WithRegistersLayer": (
        "norm1",
        "attention",
        ("layer_scale1", "drop_path"),
        "norm2",
        "mlp",
        ("layer_scale2", "drop_path"),
    ),
}

# family defaults when the folder has no preprocessor_config.json (the HF image processors' defaults)
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
_OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
DEFAULT_PREPROCESS = {  # model_type -> (mean, std, interpolation, crop_pct)
    "vit": (*_HALF, "bilinear", 1.0),
    "deit": (*_IMAGENET, "bicubic", 224 / 256),
    "clip_vision_model": (*_OPENAI, "bicubic", 1.0),
    "siglip_vision_model": (*_HALF, "bicubic", 1.0),
    "dinov2": (*_IMAGENET, "bicubic", 224 / 256),
    "dinov2_with_registers": (*_IMAGENET, "bicubic", 224 / 256),
}
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


class HFImageModel(nn.Module):
    """A transformers vision model with one exported output: pixel_values [B, 3, H, W] -> [B, ...]."""

    def __init__(self, hf_model: nn.Module, preprocess: Optional[dict] = None):
        super().__init__()
        name = type(hf_model).__name__
        if name not in OUTPUTS:
            raise UnsupportedModelError(
                f"{name} is not a transformers class ToMe supports; supported: {', '.join(sorted(OUTPUTS))}"
            )
        self.hf = hf_model
        self.output = OUTPUTS[name]
        self.preprocess = preprocess  # from preprocessor_config.json, when the folder had one

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = getattr(self.hf(pixel_values=pixel_values), self.output)
        if out is None:
            raise UnsupportedModelError(f"{type(self.hf).__name__} returns no {self.output} (built without a pooler?)")
        return out


def hf_tome_attention(
    attn: nn.Module, x: torch.Tensor, size: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention from a transformers attention module's q/k/v/output projections, with proportional
    attention. x: [B, N, C], size: [B, N, 1] or None -> (out [B, N, C], keys [B, H, N, hd])."""
    batch, tokens, _ = x.shape
    q, k, v = (
        proj(x).reshape(batch, tokens, -1, attn.head_dim).transpose(1, 2)
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
    )  # [B, H, N, hd]
    scale = getattr(attn, "scaling", None) or attn.scale
    bias = None if size is None else proportional_attention_bias(size).to(q.dtype)  # [B, 1, 1, N]
    dropout = float(getattr(attn, "attention_dropout", 0.0) or getattr(attn, "dropout", 0.0)) if attn.training else 0.0
    out = scaled_attention(q, k, v, bias, scale, dropout)  # [B, H, N, hd]
    out_proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    return out_proj(out.transpose(1, 2).reshape(batch, tokens, -1)), k


class _PoolingAttention(nn.Module):
    """SigLIP's attention-pooling head's nn.MultiheadAttention (packed in_proj, batch first) with the heads
    split per image, [B, H, M, hd]. nn.MultiheadAttention folds them into the batch ([B * H, ...]), a
    derived dimension the export refuses (only the batch may stay symbolic). Same result as the module: the
    head attends to every token once, whatever its size (the model's own head, run unchanged)."""

    def __init__(self, attn: nn.MultiheadAttention):
        super().__init__()
        self.attn = attn

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, None]:
        """query: [B, M, C], key and value: [B, N, C] -> (out [B, M, C], None), as the module returns."""
        attn = self.attn
        biases = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None,) * 3
        q, k, v = (
            F.linear(t, weight, bias).reshape(t.shape[0], t.shape[1], attn.num_heads, -1).transpose(1, 2)
            for t, weight, bias in zip((query, key, value), attn.in_proj_weight.chunk(3), biases)
        )  # [B, H, *, hd]
        out = scaled_attention(q, k, v, dropout=attn.dropout if attn.training else 0.0)  # [B, H, M, hd]
        return attn.out_proj(out.transpose(1, 2).reshape(query.shape)), None


class _LayersCall(nn.Module):
    """Stands in the model's layer list: `layer(hidden_states, attention_mask, **kwargs)` runs every ToMe layer."""

    def __init__(self, blocks: nn.Module):
        super().__init__()
        self.tome_blocks = blocks

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, **kwargs) -> torch.Tensor:
        return self.tome_blocks(hidden_states)


def _layer_list(model: HFImageModel) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent, attribute, the ModuleList of encoder layers)."""
    for parent in model.hf.modules():
        for attr in ("layers", "layer"):
            layers = getattr(parent, attr, None)
            if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                return parent, attr, layers
    raise UnsupportedModelError(f"{type(model.hf).__name__} has no encoder layer list ToMe recognises")


def _embeddings(model: HFImageModel) -> tuple[nn.Module, Optional[nn.Module]]:
    """(the embeddings module, CLIP's pre_layrnorm or None)."""
    for parent in model.hf.modules():
        embeddings = getattr(parent, "embeddings", None)
        if isinstance(embeddings, nn.Module):
            return embeddings, getattr(parent, "pre_layrnorm", None)
    raise UnsupportedModelError(f"{type(model.hf).__name__} has no embeddings module")


class HFTransformersAdapter:
    family = "Hugging Face transformers (ViT, DeiT, CLIP vision, SigLIP vision, DINOv2)"

    def accepts(self, model: nn.Module) -> bool:
        return isinstance(model, HFImageModel)

    def check_supported(self, model: nn.Module) -> None:
        _, _, layers = _layer_list(model)
        for i, layer in enumerate(layers):
            if type(layer).__name__ not in LAYERS:
                raise UnsupportedModelError(
                    f"layer {i} of {type(model.hf).__name__} is {type(layer).__name__}; ToMe supports {', '.join(sorted(LAYERS))}"
                )

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(_layer_list(model)[2])

    def tome_block(self, block: nn.Module, r: int, num_prefix: int, formulation: MergeFormulation) -> nn.Module:
        norm1, attn, after_attn, norm2, mlp, after_mlp = LAYERS[type(block).__name__]

        def layers(*names: str) -> list[nn.Module]:
            return [getattr(block, name) for name in names]

        return PreNormToMeBlock(
            hf_tome_attention,
            *layers(norm1, attn),
            layers(*after_attn),
            *layers(norm2, mlp),
            layers(*after_mlp),
            r,
            num_prefix,
            formulation,
        )

    def install(self, model: nn.Module, blocks: nn.Module) -> None:
        parent, attr, _ = _layer_list(model)
        setattr(parent, attr, nn.ModuleList([_LayersCall(blocks)]))
        heads = [m for m in model.hf.modules() if isinstance(getattr(m, "attention", None), nn.MultiheadAttention)]
        for head in heads:  # SigLIP's attention-pooling head
            head.attention = _PoolingAttention(head.attention)

    def embed(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        embeddings, pre_norm = _embeddings(model)
        x = embeddings(pixels)
        return (x if pre_norm is None else pre_norm(x)), None

    def num_prefix_tokens(self, model: nn.Module) -> int:
        embeddings, _ = _embeddings(model)
        count = sum(
            isinstance(getattr(embeddings, n, None), torch.Tensor)
            for n in ("cls_token", "distillation_token", "class_embedding")
        )
        registers = getattr(embeddings, "register_tokens", None)
        return count + (int(registers.shape[1]) if isinstance(registers, torch.Tensor) else 0)

    def grid_size(self, model: nn.Module) -> tuple[int, int]:
        config = model.hf.config
        image, patch = config.image_size, config.patch_size
        image = (image, image) if isinstance(image, int) else tuple(image)
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return image[0] // patch[0], image[1] // patch[1]

    def tokens_at_input(self, model: nn.Module) -> int:
        rows, cols = self.grid_size(model)
        return rows * cols + self.num_prefix_tokens(model)

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.hf.config.hidden_size)

    def mlp_ratio(self, model: nn.Module) -> float:
        mlp = next(m.mlp for m in model.hf.modules() if isinstance(getattr(m, "mlp", None), nn.Module))
        return mlp_width_ratio(mlp, self.embed_dim(model))

    def input_spec(self, model: nn.Module) -> InputSpec:
        config = model.hf.config
        mean, std, interpolation, crop_pct = DEFAULT_PREPROCESS.get(config.model_type, (*_IMAGENET, "bicubic", 1.0))
        if model.preprocess:
            mean, std = model.preprocess.get("image_mean", mean), model.preprocess.get("image_std", std)
            interpolation = _PIL_RESAMPLE.get(model.preprocess.get("resample"), interpolation)
            crop_pct = model.preprocess.get("tome_crop_pct", crop_pct)
        rows, cols = self.grid_size(model)
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        return image_spec(
            EXPORT_SPEC.input_name,
            [int(config.num_channels), rows * patch, cols * patch],
            mean=[float(v) for v in mean],
            std=[float(v) for v in std],
            interpolation=str(interpolation),
            crop_pct=float(crop_pct),
        )

    def output_kind(self, model: nn.Module) -> str:
        return "logits" if model.output == "logits" else "embedding"


ADAPTER = HFTransformersAdapter()


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def claims(source: ModelSource) -> bool:
    """`hf:<id>`, or a folder with config.json (what save_pretrained writes)."""
    return source.name.startswith(HUB_PREFIX) or is_hf_folder(Path(source.name).expanduser())


def load_source(source: ModelSource) -> LoadedModel:
    """A claimed source as a LoadedModel at the image size its config.json gives."""
    name = source.name
    if source.checkpoint or source.arch:
        raise InvalidInputError(
            f"{name} is a Hugging Face model: its folder holds config and weights; drop --checkpoint and --model"
        )
    model, weights = load_hf(
        name if name.startswith(HUB_PREFIX) else str(Path(name).expanduser()), pretrained=source.pretrained
    )
    adapter = adapter_for(model)
    spec = checked_input_spec(adapter, model, name)
    if source.img_size is not None and spec.kind != "image":
        raise InvalidInputError(
            f"{name} takes {spec.kind} input {spec.describe_shape()}, fixed by its config.json; drop --img-size"
        )
    native = spec.shape[-1]
    if source.img_size is not None and source.img_size != native:
        raise InvalidInputError(
            f"{name} is configured for {native} px images; drop --img-size {source.img_size} "
            "(change image_size in its config.json to export another size)"
        )
    return LoadedModel(model, adapter, type(model.hf).__name__, weights, random_weights=False, seed=None)


SOURCE_FORM = SourceForm("hf:<id> or save_pretrained folder", claims, load_source)


def read_json_object(file: Path, max_bytes: int, what: str) -> dict:
    """The JSON object in `file`, read only when it is at most `max_bytes`; ModelLoadError naming the file for a
    larger, unreadable, malformed or too deeply nested file, or one that holds no JSON object."""
    try:
        if file.stat().st_size > max_bytes:
            raise ModelLoadError(f"{file} is over {max_bytes >> 20} MiB; it is not a {what}")
        raw = read_input_bytes(file, what, max_bytes)  # a FIFO or device is refused unread
    except OSError as err:
        raise ModelLoadError(f"{file} is not a readable JSON {what}: {error_reason(err)}") from err
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ModelLoadError(f"{file} is not a readable JSON {what}: {error_reason(err)}") from err
    if not isinstance(value, dict):
        raise ModelLoadError(f"{file} holds a JSON {type(value).__name__}, not a {what} object")
    return value


MAX_PROCESSOR_CONFIG_BYTES = 1 << 20  # a preprocessor_config.json is a few hundred bytes


def processor_config(folder: Path) -> Optional[dict]:
    """preprocessor_config.json with crop_pct worked out (crop size over resize size), or None. Read capped
    in size and checked value by value: a bad value is a one-line ModelLoadError naming the file and key."""
    file = folder / "preprocessor_config.json"
    if not file.exists():  # a FIFO or device in its place is refused by read_json_object, never skipped
        return None

    def bad(key: str, why: str) -> ModelLoadError:
        return ModelLoadError(f"{file}: {why} (key {key!r}); fix or delete the file (the family defaults are used)")

    cfg = read_json_object(file, MAX_PROCESSOR_CONFIG_BYTES, "processor config")
    for key in ("image_mean", "image_std"):
        value = cfg.get(key)
        if value is None:
            continue
        if (
            not isinstance(value, list)
            or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        ):
            raise bad(key, f"{key} is {_shown(value)}; it must be a list of 3 finite numbers (one per RGB channel)")
        if key == "image_std" and not all(v > 0 for v in value):
            raise bad(key, f"image_std is {value}; every value must be > 0 (pixels are divided by it)")
    if "resample" in cfg and cfg["resample"] not in _PIL_RESAMPLE:
        raise bad(
            "resample",
            f"resample is {_shown(cfg['resample'])}; ToMe exports PIL's "
            + ", ".join(f"{k} ({v})" for k, v in _PIL_RESAMPLE.items()),
        )

    def edge(key: str, names: tuple[str, ...]) -> Optional[int]:
        value = cfg.get(key)
        if value is None:
            return None
        values = [value.get(name) for name in names if name in value] if isinstance(value, dict) else [value]
        if not values:
            return None  # e.g. only longest_edge: no square edge to take
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_IMAGE_EDGE for v in values):
            raise bad(
                key,
                f"{key} is {_shown(value)}; it must be a positive integer up to {MAX_IMAGE_EDGE} "
                f"or an object of them ({', '.join(names)})",
            )
        return values[0]

    size = edge("size", ("shortest_edge", "height", "width"))
    crop = edge("crop_size", ("height", "width"))
    do_center_crop = cfg.get("do_center_crop", False)
    if not isinstance(do_center_crop, bool):
        raise bad("do_center_crop", f"do_center_crop is {_shown(do_center_crop)}; it must be true or false")
    if do_center_crop and size and crop:
        if crop > size:
            raise bad(
                "crop_size", f"crop_size {crop} is larger than size {size}; the centre crop must fit the resized image"
            )
        cfg["tome_crop_pct"] = float(crop) / float(size)
    else:
        cfg["tome_crop_pct"] = 1.0
    return cfg


MAX_IMAGE_EDGE = 16384  # px; a processor size beyond this is not a real preprocessing setting


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:60] + "..."


MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few KB; a larger one is not a model config


def refuse_custom_code(config_file: Path, transformers: Any) -> None:
    """ModelLoadError, before transformers reads the folder, for a config.json that asks for code of its own
    (an `auto_map`, or a `model_type` transformers does not ship): such a folder is never loaded, so no
    prompt appears and none of its Python runs."""
    config = read_json_object(config_file, MAX_CONFIG_BYTES, "model config")
    if "auto_map" in config:
        raise ModelLoadError(
            f"{config_file} has an 'auto_map' key: the folder asks to run its own Python code, which tome-deploy "
            "never does; save the model with a transformers class (save_pretrained of e.g. ViTForImageClassification)"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in transformers.CONFIG_MAPPING:
        raise ModelLoadError(
            f"{config_file}: 'model_type' {model_type!r} is not a model type transformers ships, so loading it would "
            "need the folder's own code; tome-deploy loads transformers' own classes only"
        )


MAX_INDEX_BYTES = 16 << 20  # model.safetensors.index.json: a weight_map of names to shard files
_LAYER_INDEX = re.compile(r"^(.*\.layers?)\.(\d+)\.")
_SIZE_KEYS = (
    "hidden_size",
    "intermediate_size",
    "mlp_ratio",
    "num_channels",
    "image_size",
    "patch_size",
    "num_labels",
    "projection_dim",
    "num_register_tokens",
)


def _header_shapes(folder: Path) -> Optional[dict[str, tuple[int, ...]]]:
    """Tensor name -> shape from the safetensors header(s) of a save_pretrained folder (model.safetensors, or
    the shards its index lists), without loading a tensor; None when the folder has neither."""
    from safetensors import safe_open

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = read_json_object(index, MAX_INDEX_BYTES, "shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no 'weight_map' object; it is not a shard index")
        names = list(weight_map.values())
        if not all(isinstance(n, str) and Path(n).name == n for n in names):
            raise ModelLoadError(
                f"{index} names shard files outside its folder; re-save the model with save_pretrained"
            )
        files = [folder / n for n in sorted(set(names))]
    else:
        return None
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as err:  # safetensors raises its own SafetensorError, OSError, ...
            raise ModelLoadError(f"{file} is not a readable safetensors file: {error_reason(err)}") from err
    return shapes


def _listed(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _expected_shapes(skeleton: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The skeleton's tensor names and shapes as a weights file holds them. transformers 5 renames some modules'
    weights (ViT's attention.attention.query -> attention.q_proj) and save_pretrained writes the original names
    back; whichever naming matches more of the file's names is compared (meta tensors: no memory)."""
    state = skeleton.state_dict()
    candidates = [{name: tuple(t.shape) for name, t in state.items()}]
    try:
        from transformers.core_model_loading import revert_weight_conversion

        reverted = revert_weight_conversion(skeleton, dict(state))
        candidates.append({name: tuple(t.shape) for name, t in reverted.items()})
    except Exception:  # noqa: BLE001 - another transformers version: its own names only
        pass
    return max(candidates, key=lambda names: len(names.keys() & shapes.keys()))


def check_weights_match_config(folder: Path, config: Any, model_class: Any) -> None:
    """Before the model is built: config.json's sizes against the weights file's header (names and shapes, no
    tensor read). The layer count is compared first, so a 1 KB config asking for 100000 layers is refused
    before anything is built; then the model's skeleton is built on the meta device (no memory) and every
    tensor name and shape is compared: missing, unexpected or mis-shaped weights are refused with the first
    few named (transformers would initialise missing ones at random and export them)."""
    shapes = _header_shapes(folder)
    if shapes is None:
        return  # no safetensors: from_pretrained refuses the folder with its own message
    indices: dict[str, set[int]] = {}
    for name in shapes:
        match = _LAYER_INDEX.match(name)
        if match:
            indices.setdefault(match.group(1), set()).add(int(match.group(2)))
    declared = getattr(config, "num_hidden_layers", None)
    if isinstance(declared, int):
        in_file = max((len(found) for found in indices.values()), default=0)
        if declared != in_file:
            raise ModelLoadError(
                f"{folder / 'config.json'}: 'num_hidden_layers' is {declared} but the weights hold {in_file} layers; "
                "fix config.json or re-save the model with save_pretrained"
            )
    try:
        with torch.device("meta"):
            skeleton = model_class(config)
    except Exception as err:
        raise ModelLoadError(
            f"{folder / 'config.json'} does not describe a buildable {model_class.__name__}: {error_reason(err)}"
        ) from err
    expected = _expected_shapes(skeleton, shapes)
    del skeleton
    reshaped = [name for name in expected if name in shapes and shapes[name] != expected[name]]
    if reshaped:
        name = reshaped[0]
        sizes = ", ".join(
            f"{key} {getattr(config, key)}"
            for key in _SIZE_KEYS
            if isinstance(getattr(config, key, None), (int, float))
        )
        raise ModelLoadError(
            f"{folder / 'config.json'} does not match the weights: {name} is {list(shapes[name])} in the file but the "
            f"config ({sizes}) makes it {list(expected[name])} ({len(reshaped)} tensors differ); fix config.json"
        )
    missing = [name for name in expected if name not in shapes]
    unexpected = [name for name in shapes if name not in expected]
    if missing or unexpected:
        parts = ([f"missing {len(missing)} ({_listed(missing)})"] if missing else []) + (
            [f"{len(unexpected)} unexpected ({_listed(unexpected)})"] if unexpected else []
        )
        raise ModelLoadError(
            f"the weights in {folder} do not fit {model_class.__name__}: {'; '.join(parts)}; "
            "re-save the model with save_pretrained (missing weights would be random)"
        )


# What a hub model's snapshot may bring: configs and safetensors weights, never code or pickles.
HUB_FILES = (
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
)


def hub_snapshot(repo_id: str) -> Path:
    """The local folder holding a hub model's HUB_FILES (the hub cache's snapshot), downloaded when the hub is
    reachable and taken from the cache when it is not; a hub model is then read and checked as a folder is."""
    from huggingface_hub import snapshot_download

    from tome_deploy.models.loading.timm_source import hub_offline, hub_unreachable

    offline = hub_unreachable()
    try:
        with hub_offline(offline):
            return Path(snapshot_download(repo_id, allow_patterns=list(HUB_FILES)))
    except Exception as err:  # huggingface_hub raises its own errors, OSError, ValueError, ...
        raise ModelLoadError(
            f"the Hugging Face hub {'is not reachable' if offline else 'did not give'} {repo_id} and its files are "
            f"not in the local cache ({error_reason(err)}); download the model where a network is, save_pretrained "
            "it, and pass the folder"
        ) from err


def load_hf(source: str, *, pretrained: bool) -> tuple[nn.Module, str]:
    """A save_pretrained folder or hf:<id> (with --pretrained) -> (HFImageModel, or the wrapper of a class in
    HF_FAMILY_MODULES, in eval mode; weights line).

    A hub model is first fetched to its snapshot folder (hub_snapshot), so both take the same path: no code of
    the folder's own, the preprocessor config checked, and the weights compared with the config before the
    model is built."""
    try:
        import transformers
    except ImportError as err:
        raise MissingDependencyError(
            f"Hugging Face models need transformers: pip install 'tome-deploy[families]' ({err})"
        ) from err
    transformers.utils.logging.disable_progress_bar()  # keep stderr to our lines
    hub = source.startswith(HUB_PREFIX)
    if hub and not pretrained:
        raise ModelLoadError(
            f"{source} names hub weights; pass --pretrained to download them (or a local save_pretrained folder)"
        )
    folder = hub_snapshot(source[len(HUB_PREFIX) :]) if hub else Path(source)
    refuse_custom_code(folder / "config.json", transformers)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise ModelLoadError(f"{source} has no readable config.json: {error_reason(err)}") from err
    arch = (config.architectures or [None])[0]
    if arch not in OUTPUTS and arch not in HF_FAMILY_MODULES:
        raise UnsupportedModelError(
            f"{source} is a {arch or config.model_type} model; ToMe supports {', '.join(sorted({*OUTPUTS, *HF_FAMILY_MODULES}))}"
        )
    family = importlib.import_module(HF_FAMILY_MODULES[arch]) if arch in HF_FAMILY_MODULES else None
    # checked before anything is built
    preprocess = family.read_preprocessing(folder, config) if family is not None else processor_config(folder)
    check_weights_match_config(folder, config, getattr(transformers, arch))
    try:
        hf_model = getattr(transformers, arch).from_pretrained(
            folder, local_files_only=True, use_safetensors=True, trust_remote_code=False
        )
    except Exception as err:
        raise ModelLoadError(
            f"cannot load {arch} from {source} ({error_reason(err)}); the folder needs model.safetensors "
            "(pickled pytorch_model.bin is not read)"
        ) from err
    weights = f"transformers {arch} from {source if hub else Path(source).name}"
    model = family.wrap(hf_model, preprocess) if family is not None else HFImageModel(hf_model, preprocess)
    return model.eval(), weights
