"""Model sources of one small model per family, with weights that depend on nothing but a seed.

Each source is what a user passes to tome-export: a timm name, a Hugging Face `save_pretrained` folder, or
an OpenCLIP architecture with a `--checkpoint` file. Weights come from numpy's seeded generator, not from a
library's initialiser, so a new transformers or open_clip release cannot change them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tome_deploy.models.loading.source import ModelSource


def seeded_state_dict(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Every float tensor drawn again: norm scales 1 + 0.1 n, other vectors 0.1 n, matrices n / sqrt(fan_in)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key in sorted(state_dict):
        value = state_dict[key]
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        noise = rng.standard_normal(tuple(value.shape)).astype(np.float32)
        if value.ndim == 1 and key.endswith("weight"):
            drawn = 1.0 + 0.1 * noise
        elif value.ndim <= 1:
            drawn = 0.1 * noise
        else:
            drawn = noise / np.sqrt(np.prod(value.shape[1:]))
        out[key] = torch.from_numpy(drawn).to(value.dtype)
    return out


# A ViTForImageClassification config: 3 layers, width 32, 8 x 8 patches of 4 px, 10 labels.
TINY_HF_VIT = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=32,
    patch_size=4,
    num_labels=10,
)


def hf_vit_folder(folder: Path) -> ModelSource:
    """A save_pretrained ViTForImageClassification: 3 layers, width 32, 8 x 8 patches of 4 px, 10 labels."""
    import transformers

    config = transformers.ViTConfig(**TINY_HF_VIT)
    model = transformers.ViTForImageClassification(config)
    model.load_state_dict(seeded_state_dict(model.state_dict(), seed=1))
    model.save_pretrained(folder)
    return ModelSource(str(folder))


# An ASTForAudioClassification config: 2 layers, width 32, 4 heads; 100 frames x 32 mel bins in 16 x 16 patches with
# strides of 10 (overlapping, with a remainder on both axes): 2 x 9 patches + the class and distillation tokens.
TINY_HF_AST = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_length=100,
    num_mel_bins=32,
    patch_size=16,
    frequency_stride=10,
    time_stride=10,
    num_labels=5,
)


def hf_ast_folder(folder: Path, model_class: str = "ASTForAudioClassification") -> ModelSource:
    """A save_pretrained AST (TINY_HF_AST) with seeded weights and its feature extractor's
    preprocessor_config.json (8 kHz audio, a mean and std of its own)."""
    import transformers

    model = getattr(transformers, model_class)(transformers.ASTConfig(**TINY_HF_AST))
    model.load_state_dict(seeded_state_dict(model.state_dict(), seed=4))
    model.save_pretrained(folder)
    transformers.ASTFeatureExtractor(
        sampling_rate=8000,
        num_mel_bins=TINY_HF_AST["num_mel_bins"],
        max_length=TINY_HF_AST["max_length"],
        mean=-3.5,
        std=4.0,
    ).save_pretrained(folder)
    return ModelSource(str(folder))


OPEN_CLIP_TINY = {  # an OpenCLIP model config, registered as the architecture "tome-test-tiny"
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def open_clip_checkpoint(folder: Path) -> ModelSource:
    """open_clip:tome-test-tiny (3 blocks, width 64, 8 x 8 patches and the class token), registered from a
    config file as a user registers their own, with a seeded image-tower state dict as --checkpoint."""
    import json

    import open_clip
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "tome-test-tiny.json"
    config.write_text(json.dumps(OPEN_CLIP_TINY))
    open_clip.add_model_config(config)
    visual = open_clip.create_model("tome-test-tiny", pretrained=None).visual
    state = {
        f"visual.{key}": value.contiguous() for key, value in seeded_state_dict(visual.state_dict(), seed=2).items()
    }
    save_file(state, str(folder / "visual.safetensors"))
    return ModelSource("open_clip:tome-test-tiny", checkpoint=str(folder / "visual.safetensors"))


def timm_eva_module(path: Path) -> ModelSource:
    """A torch.save'd timm Eva (eva02_tiny_patch14_224 at 84 px, 3 blocks, 7 classes) with seeded weights:
    36 patches and the class token, rotary positions, SwiGLU MLP."""
    import timm

    model = timm.create_model("eva02_tiny_patch14_224", img_size=84, depth=3, num_classes=7)
    model.load_state_dict(seeded_state_dict(model.state_dict(), seed=3))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model, path)
    return ModelSource(str(path))


# family -> (how its source is made, given a scratch folder; r)
FAMILY_SOURCES = {
    "timm_eva": (lambda folder: timm_eva_module(folder / "eva.pt"), 6),
    "hf_vit": (lambda folder: hf_vit_folder(folder / "hf_vit"), 4),
    "open_clip": (lambda folder: open_clip_checkpoint(folder / "open_clip"), 4),
}


# transformers video class -> its config class and the config: 2 layers, width 32, 4 heads, clips of 4 frames
# of 32 x 32, tubelets of 2 frames x 8 x 8 pixels (2 x 4 x 4 = 32 tokens), gelu, 5 labels
TINY_HF_VIDEO = {
    "VideoMAEForVideoClassification": ("VideoMAEConfig", {"patch_size": 8, "tubelet_size": 2}),
    "VideoMAEModel": ("VideoMAEConfig", {"patch_size": 8, "tubelet_size": 2}),
    "VivitForVideoClassification": ("VivitConfig", {"tubelet_size": [2, 8, 8], "hidden_act": "gelu"}),
    "TimesformerForVideoClassification": ("TimesformerConfig", {"patch_size": 8}),
}


def hf_video_folder(folder: Path, class_name: str, seed: int = 4, **config: object) -> ModelSource:
    """A save_pretrained transformers video model of `class_name` (TINY_HF_VIDEO) with seeded weights."""
    import transformers

    config_class, arguments = TINY_HF_VIDEO[class_name]
    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_frames=4,
        image_size=32,
        num_labels=5,
        **arguments,
    )
    model = getattr(transformers, class_name)(getattr(transformers, config_class)(**{**settings, **config}))
    model.load_state_dict(seeded_state_dict(model.state_dict(), seed=seed))
    model.save_pretrained(folder)
    return ModelSource(str(folder))
