"""Checkpoint files and their adaptation to a model: reading (safetensors, torch zip or legacy pickle),
finding the state dict inside a training checkpoint, the architecture it names, and loading it into
a model (prefix stripping, classifier size, image size and position-embedding resampling)."""

from __future__ import annotations

import difflib
import math
import operator
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tome_deploy.errors import (
    InvalidInputError,
    ModelLoadError,
    display_path,
    error_reason,
)
from tome_deploy.models.loading.safe_pickle import read_torch


def read_file(path: Path, *, trust_pickle: bool) -> tuple[Any, dict[str, str]]:
    """The object stored in `path` and, for safetensors, the file's metadata."""
    kind = _sniff(path)
    if kind == "safetensors" or (kind == "other" and path.suffix.lower() == ".safetensors"):
        return read_safetensors(path)
    return read_torch(path, kind, trust_pickle=trust_pickle), {}

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")  # timm names that point at a hub or a local folder


def _sniff(path: Path) -> str:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as err:
        raise ModelLoadError(f"cannot read {display_path(path)}: {err.strerror or err}") from err
    if size == 0:
        raise ModelLoadError(f"{display_path(path)} is empty (0 bytes); the file is truncated or was never written")
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    return "other"


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise ModelLoadError(
            f"{display_path(path)} is not a readable safetensors file (corrupt or truncated?): {error_reason(err)}"
        ) from err
    return tensors, metadata


# ----------------------------------------------------------------------------------------------------------
# State dicts


_CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    shown = display_path(path)
    if not isinstance(obj, Mapping):
        raise ModelLoadError(
            f"{shown} holds a {type(obj).__module__}.{type(obj).__qualname__}, neither a state dict nor an nn.Module"
        )
    if _is_tensor_dict(obj):
        return dict(obj)
    for key in _CHECKPOINT_KEYS:
        if _is_tensor_dict(obj.get(key)):
            return dict(obj[key])
    keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
    raise ModelLoadError(
        f"{shown} holds a dict that is not a state dict: its values are not all tensors and it has no "
        f"{'/'.join(repr(k) for k in _CHECKPOINT_KEYS[:3])} entry (keys: {keys})"
    )


def checkpoint_arch(arch: Optional[str], obj: Any, metadata: Mapping[str, str], path: Path) -> str:
    """--model ARCH, else the checkpoint's `arch` key / `args.model` (timm train.py), else safetensors metadata."""
    if arch:
        require_timm_name(arch, flag="--model")
        return arch
    found: list[tuple[str, str]] = []
    if isinstance(obj, Mapping):
        if isinstance(obj.get("arch"), str):
            found.append(("'arch' key", obj["arch"]))
        args = obj.get("args")
        model_arg = args.get("model") if isinstance(args, Mapping) else getattr(args, "model", None)
        if isinstance(model_arg, str):
            found.append(("args.model", model_arg))
    if isinstance(metadata.get("arch"), str):
        found.append(("metadata 'arch'", metadata["arch"]))
    for _, name in found:
        if is_timm_name(name):
            return name
    shown = display_path(path)
    if found:
        where, name = found[0]
        raise ModelLoadError(
            f"the {where} of {shown} is '{name}', not a timm model name; pass --model ARCH to name the timm "
            "architecture (e.g. --model vit_base_patch16_224)"
        )
    raise ModelLoadError(
        f"{shown} is a state dict without an 'arch' key; pass --model ARCH to name its timm architecture "
        "(e.g. --model vit_base_patch16_224)"
    )


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) key prefixes."""
    out = dict(state_dict)
    changed = True
    while changed and out:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(key.startswith(prefix) for key in out):
                out = {key[len(prefix):]: value for key, value in out.items()}
                changed = True
    return out


def checkpoint_num_classes(state_dict: Mapping[str, Any]) -> Optional[int]:
    """Classifier width stored in the checkpoint: head.weight rows, 0 for a headless checkpoint."""
    state_dict = _strip_prefixes(state_dict)
    head = state_dict.get("head.weight")
    if isinstance(head, torch.Tensor) and head.ndim == 2:
        return int(head.shape[0])
    if "pos_embed" in state_dict and not any(key.startswith("head.") for key in state_dict):
        return 0
    return None


def checkpoint_img_size(model: nn.Module, state_dict: Mapping[str, Any]) -> Optional[int]:
    """The square image size the checkpoint's pos_embed was trained at, when it differs from the model's."""
    state_dict = _strip_prefixes(state_dict)
    pos_embed = state_dict.get("pos_embed")
    if not isinstance(pos_embed, torch.Tensor) or pos_embed.ndim != 3 or getattr(model, "pos_embed", None) is None:
        return None
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    tokens = int(pos_embed.shape[1]) - prefix
    grid = math.isqrt(max(tokens, 0))
    stride = _patch_stride(model)
    if grid < 1 or grid * grid != tokens or stride is None or stride[0] != stride[1]:
        return None
    size = grid * stride[0]
    if tuple(model.patch_embed.img_size) == (size, size):
        return None
    return size


def load_weights(model: nn.Module, state_dict: Mapping[str, Any], *, source: str, arch: str) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    shown = display_path(Path(source))
    state_dict = _strip_prefixes(state_dict)
    try:
        state_dict = checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"checkpoint {shown} does not match the architecture {arch}: {error_reason(err)}") from err
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and isinstance(state_dict[key], torch.Tensor) and isinstance(expected[key], torch.Tensor)
        and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatch (checkpoint vs model)", mismatched)):
            if items:
                more = f" and {len(items) - 5} more" if len(items) > 5 else ""
                problems.append(f"{label}: {', '.join(items[:5])}{more}")
        raise ModelLoadError(
            f"checkpoint {shown} does not match the architecture {arch}: {'; '.join(problems)}; pass the --model "
            "ARCH the checkpoint was trained with"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"checkpoint {shown} does not match the architecture {arch}: {error_reason(err)}") from err


# ----------------------------------------------------------------------------------------------------------
# Image size


def check_img_size_value(img_size: Optional[int]) -> None:
    if img_size is None:
        return
    try:
        valid = not isinstance(img_size, bool) and operator.index(img_size) == img_size
    except TypeError:
        valid = False
    if not valid:
        raise InvalidInputError(f"--img-size must be a positive integer, got {img_size!r}")
    if img_size <= 0:
        raise InvalidInputError(f"--img-size must be a positive integer, got {img_size}")


def _patch_stride(model: nn.Module) -> Optional[tuple[int, int]]:
    """Input pixels per token along (H, W): patch size times the backbone stride of a hybrid ViT."""
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None:
        return None
    patch = (patch, patch) if isinstance(patch, int) else tuple(int(p) for p in patch)
    ratio = getattr(embed, "feature_ratio", None)
    if ratio is not None:
        ratio = (ratio, ratio) if isinstance(ratio, int) else tuple(int(r) for r in ratio)
        patch = (patch[0] * ratio[0], patch[1] * ratio[1])
    return patch[0], patch[1]


def check_img_size(model: nn.Module, img_size: Optional[int], arch: str) -> None:
    if img_size is None:
        return
    stride = _patch_stride(model)
    if stride is None:
        return
    step = math.lcm(*stride)
    if img_size % step == 0:
        return
    lower, upper = img_size // step * step, (img_size // step + 1) * step
    nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
    patch = f"{stride[0]}" if stride[0] == stride[1] else f"{stride[0]}x{stride[1]}"
    raise InvalidInputError(
        f"--img-size {img_size} is not a multiple of the patch size {patch} of {arch}; use {nearest}"
    )


def is_timm_name(name: str) -> bool:
    import timm

    from tome_deploy.models import digits  # noqa: F401 - registers tome_digits_vit with timm

    return name.startswith(HUB_PREFIXES) or timm.is_model(name)


def require_timm_name(name: str, *, flag: Optional[str] = None) -> None:
    """`flag` names the option the name came from (e.g. --model); None for the MODEL argument itself."""
    if is_timm_name(name):
        return
    import timm

    matches = difflib.get_close_matches(name.lower(), timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(matches)}?" if matches else ""
    if flag:
        raise ModelLoadError(f"{flag} {name} is not a timm model name{hint}")
    raise ModelLoadError(
        f"unknown model '{name}': not a timm model name, and no such file exists (a checkpoint path must "
        f"exist and end in {'/'.join(CHECKPOINT_SUFFIXES)}){hint}"
    )
