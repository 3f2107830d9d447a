"""Hugging Face transformers 5.x audio classifiers: the Audio Spectrogram Transformer (`ASTForAudioClassification`,
`ASTModel`).

AST is a pre-norm ViT on a log-mel spectrogram `input_values` [B, time, mel]. Its patch embedding is a 16 x 16
convolution with a stride of `frequency_stride` x `time_stride` (10 x 10 by default), so patches overlap and the
token count is the convolution's real output, not the spectrogram's area over 256:
`((mel - 16) // frequency_stride + 1) * ((time - 16) // time_stride + 1)` patches, frequency-major, plus the class
and distillation tokens in front (1024 x 128 frames: 12 * 101 + 2 = 1214 tokens). Both prefix tokens are
protected, and the model's own pooling runs unchanged: the mean of the two after the final layernorm
(`pooler_output`), then the classifier head (`logits`).

The layers are transformers' ViT-style pre-norm layers, so they run through the Hugging Face family's attention
(`hf_transformers.hf_tome_attention`) and the shared `PreNormToMeBlock`. Loading is the Hugging Face folder
loader's (hf_transformers.py: no remote code, size-capped config, weights checked against the config before
anything is built); this module gives it the class's preprocessing reader and wrapper (`HF_FAMILY_MODULES`
there). The input spec records the feature extractor's settings (artifact/input_spec.py, kind
`audio_spectrogram`) from the folder's `preprocessor_config.json`, else ASTFeatureExtractor's defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tome_deploy.artifact.checks import FieldError
from tome_deploy.artifact.formulations import MergeFormulation
from tome_deploy.artifact.input_spec import InputSpec
from tome_deploy.errors import InvalidInputError, ModelLoadError, UnsupportedModelError
from tome_deploy.models.adapter import mlp_width_ratio
from tome_deploy.models.blocks import PreNormToMeBlock
from tome_deploy.models.hf_transformers import (
    MAX_PROCESSOR_CONFIG_BYTES,
    _LayersCall,
    hf_tome_attention,
    read_json_object,
)

# model class -> the output exported
OUTPUTS = {"ASTForAudioClassification": "logits", "ASTModel": "pooler_output"}
INPUT_NAME = "input_values"
NUM_PREFIX_TOKENS = 2  # the class and the distillation token

FEATURE_EXTRACTOR = "ASTFeatureExtractor"
# ASTFeatureExtractor's defaults (AudioSet's log-mel mean and std), for the keys a folder's
# preprocessor_config.json does not set or when it has none; mel bins and length always come from the model.
FEATURE_EXTRACTOR_DEFAULTS: dict[str, Any] = {
    "sampling_rate": 16000,
    "mean": -4.2677393,
    "std": 4.5689974,
    "do_normalize": True,
}
_SETTINGS = ("sampling_rate", "num_mel_bins", "max_length", "mean", "std", "do_normalize")


class HFAudioModel(nn.Module):
    """A transformers AST model with one exported output: input_values [B, time, mel] -> [B, ...]."""

    def __init__(self, hf_model: nn.Module, preprocess: dict[str, Any]):
        super().__init__()
        name = type(hf_model).__name__
        if name not in OUTPUTS:
            raise UnsupportedModelError(
                f"{name} is not an audio class ToMe supports; supported: {', '.join(sorted(OUTPUTS))}"
            )
        self.hf = hf_model
        self.output = OUTPUTS[name]
        self.preprocess = preprocess  # the feature extractor's settings (read_preprocessing)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        """input_values: [B, time, mel] -> logits [B, labels] or pooler_output [B, C]."""
        config = self.hf.config
        expected = (config.max_length, config.num_mel_bins)
        if tuple(input_values.shape[1:]) != expected:
            raise InvalidInputError(
                f"{type(self.hf).__name__} takes log-mel spectrograms of {expected[0]} frames x {expected[1]} mel bins "
                f"([batch, time, mel]), got {list(input_values.shape)}; compute them with {FEATURE_EXTRACTOR} "
                f"(max_length={expected[0]}, num_mel_bins={expected[1]})"
            )
        return getattr(self.hf(input_values=input_values), self.output)


def wrap(hf_model: nn.Module, preprocess: dict[str, Any]) -> HFAudioModel:
    """The model ToMe sees for a loaded AST class (hf_transformers.load_hf calls this)."""
    return HFAudioModel(hf_model, preprocess)


def spectrogram_spec(config: Any, settings: dict[str, Any]) -> InputSpec:
    """The input spec of an AST config with the feature extractor's settings; FieldError names a bad value."""
    return InputSpec.from_dict(
        {
            "kind": "audio_spectrogram",
            "name": INPUT_NAME,
            "shape": [config.max_length, config.num_mel_bins],
            "preprocessing": {"feature_extractor": FEATURE_EXTRACTOR, **settings},
        }
    )


def read_preprocessing(folder: Optional[Path], config: Any) -> dict[str, Any]:
    """The feature extractor's settings for an AST config: the folder's preprocessor_config.json (size-capped,
    every value checked, its mel bins and length equal to the model's) over ASTFeatureExtractor's defaults.
    Read before the model is built; a bad file or value is a one-line ModelLoadError naming it."""
    settings = {
        **FEATURE_EXTRACTOR_DEFAULTS,
        "num_mel_bins": config.num_mel_bins,
        "max_length": config.max_length,
    }
    file = folder / "preprocessor_config.json" if folder is not None else None
    where = "config.json"
    if file is not None and file.is_file():
        values = read_json_object(file, MAX_PROCESSOR_CONFIG_BYTES, "feature extractor config")
        kind = values.get("feature_extractor_type", FEATURE_EXTRACTOR)
        if kind != FEATURE_EXTRACTOR:
            raise ModelLoadError(
                f"{file}: 'feature_extractor_type' is {str(kind)[:60]!r}, but an AST model takes {FEATURE_EXTRACTOR}'s "
                f"log-mel spectrogram; fix or delete the file ({FEATURE_EXTRACTOR}'s defaults are used)"
            )
        settings.update({key: values[key] for key in _SETTINGS if key in values})
        where = str(file)
    try:
        spectrogram_spec(config, settings)
    except FieldError as err:
        raise ModelLoadError(
            f"{where}: the spectrogram input {err}; fix {where} so the model and its feature extractor agree"
        ) from None
    return settings


def _encoder(model: HFAudioModel) -> nn.Module:
    """The ASTModel (the classifier's `audio_spectrogram_transformer`, or the model itself)."""
    return getattr(model.hf, "audio_spectrogram_transformer", model.hf)


class HFAudioAdapter:
    family = "Hugging Face transformers audio (AST)"

    def accepts(self, model: nn.Module) -> bool:
        return isinstance(model, HFAudioModel)

    def check_supported(self, model: nn.Module) -> None:
        for i, layer in enumerate(self.blocks(model)):
            if type(layer).__name__ != "ASTLayer":
                raise UnsupportedModelError(
                    f"layer {i} of {type(model.hf).__name__} is {type(layer).__name__}; ToMe supports ASTLayer"
                )

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(_encoder(model).layers)

    def tome_block(self, block: nn.Module, r: int, num_prefix: int, formulation: MergeFormulation) -> nn.Module:
        return PreNormToMeBlock(
            hf_tome_attention,
            block.layernorm_before,
            block.attention,
            [block.dropout],
            block.layernorm_after,
            block.mlp,
            [block.dropout],
            r,
            num_prefix,
            formulation,
        )

    def install(self, model: nn.Module, blocks: nn.Module) -> None:
        _encoder(model).layers = nn.ModuleList([_LayersCall(blocks)])

    def embed(self, model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """inputs: the spectrogram [B, time, mel] -> (tokens [B, N0, C], None)."""
        return _encoder(model).embeddings(inputs), None

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return NUM_PREFIX_TOKENS

    def grid_size(self, model: nn.Module) -> tuple[int, int]:
        """(frequency, time) patches: the patch convolution's output, strides included."""
        config = model.hf.config
        patch = config.patch_size
        return (
            (config.num_mel_bins - patch) // config.frequency_stride + 1,
            (config.max_length - patch) // config.time_stride + 1,
        )

    def tokens_at_input(self, model: nn.Module) -> int:
        frequency, time = self.grid_size(model)
        return frequency * time + NUM_PREFIX_TOKENS

    def embed_dim(self, model: nn.Module) -> int:
        return int(model.hf.config.hidden_size)

    def mlp_ratio(self, model: nn.Module) -> float:
        return mlp_width_ratio(self.blocks(model)[0].mlp, self.embed_dim(model))

    def input_spec(self, model: nn.Module) -> InputSpec:
        """The log-mel spectrogram [time, mel] and the feature extractor settings that compute it."""
        return spectrogram_spec(model.hf.config, model.preprocess)

    def output_kind(self, model: nn.Module) -> str:
        return "logits" if model.output == "logits" else "embedding"


ADAPTER = HFAudioAdapter()
