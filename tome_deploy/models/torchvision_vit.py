"""torchvision's VisionTransformer (`torchvision.models.VisionTransformer`, the `vit_b_16` ... `vit_h_14`
builders): `conv_proj` patch embedding (or a conv stem), a class token, `encoder.pos_embedding`, pre-norm
`EncoderBlock`s (`ln_1`, `self_attention`: a batch-first nn.MultiheadAttention, `dropout`, `ln_2`, `mlp`),
`encoder.ln` and `heads` on the class token.

Attention runs through our `scaled_attention` on the MultiheadAttention's own in_proj / out_proj weights
(open_clip_visual.mha_tome_attention), with proportional attention; the class token (prefix 1) never merges.

Sources: `torchvision:<builder>` (random weights, seeded) or `torchvision:<builder> --checkpoint PATH` (a
state dict as `torch.save(model.state_dict())` or safetensors writes it, read safely). No weights are ever
downloaded; the weights enums are read for their preprocessing metadata only.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from tome_deploy.artifact.formulations import MergeFormulation
from tome_deploy.artifact.input_spec import InputSpec, image_spec
from tome_deploy.artifact.spec import EXPORT_SPEC
from tome_deploy.errors import InvalidInputError, ModelLoadError, UnsupportedModelError, error_reason
from tome_deploy.models.adapter import adapter_for, mlp_width_ratio
from tome_deploy.models.blocks import PreNormToMeBlock
from tome_deploy.models.loading.checkpoint import existing_checkpoint, read_state_dict
from tome_deploy.models.loading.source import LoadedModel, ModelSource, SourceForm
from tome_deploy.models.open_clip_visual import mha_tome_attention

PREFIX = "torchvision:"
_MODULE = "torchvision.models.vision_transformer"
DEFAULT_IMG_SIZE = 224  # the builders' image_size when none is given

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class Architecture(NamedTuple):
    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int


# The builders torchvision ships, with the architecture each one builds (torchvision/models/vision_transformer.py).
BUILDERS = {
    "vit_b_16": Architecture(16, 12, 12, 768, 3072),
    "vit_b_32": Architecture(32, 12, 12, 768, 3072),
    "vit_l_16": Architecture(16, 24, 16, 1024, 4096),
    "vit_l_32": Architecture(32, 24, 16, 1024, 4096),
    "vit_h_14": Architecture(14, 32, 16, 1280, 5120),
}


def _valid_builders() -> str:
    return ", ".join(PREFIX + name for name in BUILDERS)


def architecture(model: nn.Module) -> Architecture:
    """The architecture of a torchvision VisionTransformer, read from the model (or its ToMe copy)."""
    attentions = [m for m in model.encoder.modules() if isinstance(m, nn.MultiheadAttention)]  # one per block
    heads = attentions[0].num_heads if attentions else 0
    return Architecture(int(model.patch_size), len(attentions), int(heads), int(model.hidden_dim), int(model.mlp_dim))


def builder_of(model: nn.Module) -> Optional[str]:
    """The torchvision builder whose architecture `model` has, or None."""
    arch = architecture(model)
    return next((name for name, known in BUILDERS.items() if known == arch), None)


def weights_transforms(builder: str, image_size: int) -> Optional[Any]:
    """The transforms (an ImageClassification preset) of `builder`'s first weights enum whose crop size is
    `image_size`, or None. Reads metadata only: nothing is downloaded."""
    from torchvision.models import get_model_weights

    for weights in get_model_weights(builder):
        transforms = weights.transforms()
        if int(transforms.crop_size[0]) == image_size:
            return transforms
    return None


class TorchvisionViTAdapter:
    family = "torchvision VisionTransformer"

    def accepts(self, model: nn.Module) -> bool:
        module = sys.modules.get(_MODULE)  # not imported: no model can be one, and importing it costs time
        return module is not None and isinstance(model, module.VisionTransformer)

    def check_supported(self, model: nn.Module) -> None:
        from torchvision.models.vision_transformer import Encoder, EncoderBlock, VisionTransformer

        name = type(model).__name__
        if type(model).forward is not VisionTransformer.forward:
            raise UnsupportedModelError(
                f"{name} overrides torchvision VisionTransformer.forward; ToMe supports the class's own forward"
            )
        if type(model.encoder) is not Encoder:
            raise UnsupportedModelError(
                f"{name}.encoder is {type(model.encoder).__name__}; ToMe supports torchvision's Encoder"
            )
        for i, block in enumerate(model.encoder.layers):
            if type(block) is not EncoderBlock:
                raise UnsupportedModelError(
                    f"block {i} of {name} is {type(block).__name__}; ToMe supports torchvision's EncoderBlock"
                )
            attn = block.self_attention
            if not isinstance(attn, nn.MultiheadAttention) or not attn.batch_first:
                raise UnsupportedModelError(
                    f"block {i} of {name} has {type(attn).__name__} attention; ToMe supports a batch-first nn.MultiheadAttention"
                )
            if attn.in_proj_weight is None or attn.bias_k is not None or attn.add_zero_attn:
                raise UnsupportedModelError(
                    f"block {i}'s nn.MultiheadAttention has separate q/k/v weights or extra key/value bias; ToMe supports the packed in_proj form"
                )

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.encoder.layers)

    def tome_block(self, block: nn.Module, r: int, num_prefix: int, formulation: MergeFormulation) -> nn.Module:
        return PreNormToMeBlock(
            mha_tome_attention,
            block.ln_1,
            block.self_attention,
            [block.dropout],
            block.ln_2,
            block.mlp,
            [],
            r,
            num_prefix,
            formulation,
        )

    def install(self, model: nn.Module, blocks: nn.Module) -> None:
        model.encoder.layers = blocks  # Encoder.forward: ln(layers(dropout(x + pos_embedding)))

    def embed(self, model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, Any]:
        x = model._process_input(pixels)  # [B, N0 - 1, C], the patch embedding or conv stem
        x = torch.cat([model.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return model.encoder.dropout(x + model.encoder.pos_embedding), None

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1  # the class token

    def grid_size(self, model: nn.Module) -> tuple[int, int]:
        side = int(model.image_size) // int(model.patch_size)
        return side, side

    def tokens_at_input(self, model: nn.Module) -> int:
        rows, cols = self.grid_size(model)
        return rows * cols + 1

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.hidden_dim)

    def mlp_ratio(self, model: nn.Module) -> float:
        return mlp_width_ratio(self.blocks(model)[0].mlp, self.embed_dim(model))

    def input_spec(self, model: nn.Module) -> InputSpec:
        """The transforms of torchvision's weights for this architecture at this image size (the first weights
        enum of the builder whose crop size is the model's image_size, e.g. vit_b_16 at 224: resize 256, crop
        224, bilinear; at 384: the SWAG weights' 384 / 384 bicubic). A model of no builder's architecture, or at
        a size no weights were trained at: ImageNet mean / std, bilinear, crop_pct 1.0 (resize to the input)."""
        size = int(model.image_size)
        builder = builder_of(model)
        transforms = weights_transforms(builder, size) if builder is not None else None
        config: dict[str, Any] = {
            "mean": list(_IMAGENET_MEAN),
            "std": list(_IMAGENET_STD),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
        }
        if transforms is not None:
            config.update(
                mean=[float(v) for v in transforms.mean],
                std=[float(v) for v in transforms.std],
                interpolation=str(transforms.interpolation.value),
                crop_pct=float(transforms.crop_size[0]) / float(transforms.resize_size[0]),
            )
        return image_spec(EXPORT_SPEC.input_name, [3, size, size], **config)

    def output_kind(self, model: nn.Module) -> str:
        heads = model.heads
        last = heads[-1] if isinstance(heads, nn.Sequential) and len(heads) else heads
        return "logits" if isinstance(last, nn.Linear) and last.out_features > 0 else "embedding"


ADAPTER = TorchvisionViTAdapter()


# ----------------------------------------------------------------------------------------------------------
# The torchvision:<builder> source form


def _checkpoint_image_size(state: dict[str, torch.Tensor], builder: str, path: Path) -> Optional[int]:
    """The image size a torchvision checkpoint was trained at, from its encoder.pos_embedding; None when it has
    none. ModelLoadError when its patch embedding is not `builder`'s."""
    arch = BUILDERS[builder]
    proj = state.get("conv_proj.weight")
    if proj is not None and proj.ndim == 4 and (proj.shape[0], proj.shape[-1]) != (arch.hidden_dim, arch.patch_size):
        raise ModelLoadError(
            f"{path.name} is not a {PREFIX}{builder} checkpoint: its conv_proj makes {proj.shape[-1]} px patches of "
            f"width {proj.shape[0]}, {builder} {arch.patch_size} px patches of width {arch.hidden_dim}"
        )
    pos = state.get("encoder.pos_embedding")
    if pos is None or pos.ndim != 3:
        return None
    side = math.isqrt(max(int(pos.shape[1]) - 1, 0))
    if side * side != pos.shape[1] - 1:
        raise ModelLoadError(
            f"{path.name}'s encoder.pos_embedding holds {pos.shape[1]} tokens, not a square patch grid plus the class token"
        )
    return side * arch.patch_size


def _head_arguments(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """num_classes and representation_size as the checkpoint's heads have them (a fine-tuned head)."""
    arguments = {}
    head = state.get("heads.head.weight")
    if head is not None and head.ndim == 2:
        arguments["num_classes"] = int(head.shape[0])
    pre_logits = state.get("heads.pre_logits.weight")
    if pre_logits is not None and pre_logits.ndim == 2:
        arguments["representation_size"] = int(pre_logits.shape[0])
    return arguments


def _load_weights(model: nn.Module, state: dict[str, torch.Tensor], name: str, path: Path) -> None:
    own = model.state_dict()
    mismatched = [key for key, value in state.items() if key in own and own[key].shape != value.shape]
    if mismatched:
        key = mismatched[0]
        raise ModelLoadError(
            f"{path.name} does not fit {name}: {len(mismatched)} tensors of another shape "
            f"(e.g. {key}: {tuple(state[key].shape)} in the file, {tuple(own[key].shape)} in the model)"
        )
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ModelLoadError(f"{path.name} does not fit {name}: {error_reason(err)}") from err
    if missing or unexpected:
        raise ModelLoadError(
            f"{path.name} does not fit {name}: {len(missing)} missing keys (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); pass a state dict of torchvision.models.{name[len(PREFIX) :]}"
        )


def claims(source: ModelSource) -> bool:
    return source.name.startswith(PREFIX)


def load_source(source: ModelSource) -> LoadedModel:
    """`torchvision:<builder>`, random (seeded) or with --checkpoint's weights, at --img-size (default: the
    size the checkpoint was trained at, else 224)."""
    name = source.name
    builder = name[len(PREFIX) :]
    if builder not in BUILDERS:
        raise ModelLoadError(f"unknown torchvision ViT builder {builder!r}; valid: {_valid_builders()}")
    if source.pretrained:
        raise InvalidInputError(
            f"{name}: torchvision weights are not downloaded here (no hub); pass --checkpoint PATH, a state dict "
            f"saved from torchvision.models.{builder}"
        )
    if source.arch:
        raise InvalidInputError(f"{name} names its architecture; drop --model {source.arch}")
    patch = BUILDERS[builder].patch_size
    img_size = source.img_size
    if img_size is not None and img_size % patch:
        lower, upper = img_size // patch * patch, (img_size // patch + 1) * patch
        nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
        raise InvalidInputError(
            f"--img-size {img_size} is not a multiple of the patch size {patch} of {name}; use {nearest}"
        )
    state, path = None, None
    if source.checkpoint:
        path = existing_checkpoint(source.checkpoint)
        state = read_state_dict(path, trust_pickle=source.trust_pickle)
        trained = _checkpoint_image_size(state, builder, path)
        if trained is not None and img_size is not None and img_size != trained:
            raise InvalidInputError(
                f"{path.name} was trained at {trained} px (its encoder.pos_embedding holds {(trained // patch) ** 2 + 1} "
                f"tokens), not --img-size {img_size}; pass --img-size {trained} or a checkpoint for {img_size} px"
            )
        img_size = img_size or trained
    img_size = img_size or DEFAULT_IMG_SIZE

    import torchvision.models

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(source.seed)
        model = getattr(torchvision.models, builder)(
            weights=None, image_size=img_size, **(_head_arguments(state) if state is not None else {})
        )
    if state is None:
        return LoadedModel(
            model.eval(),
            adapter_for(model),
            name,
            f"random init (seed {source.seed}) — no pretrained weights",
            random_weights=True,
            seed=source.seed,
        )
    assert path is not None
    _load_weights(model, state, name, path)
    return LoadedModel(
        model.eval(), adapter_for(model), name, f"checkpoint {path.name}", random_weights=False, seed=None
    )


SOURCE_FORM = SourceForm("torchvision:<builder>", claims, load_source)
