"""Checkpoint files: reading one (safetensors, torch zip or legacy pickle, safely: see safe_pickle.py) and
finding what it holds: a raw state dict, the state dict of a training checkpoint, or a pickled nn.Module,
and the architecture names stored with it. Adapting a state dict to a model is the loader's job."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tome_deploy.errors import ModelLoadError, display_path, error_reason
from tome_deploy.input_files import check_input_file, open_input
from tome_deploy.models.loading.safe_pickle import read_torch

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


@dataclass(frozen=True)
class CheckpointFile:
    """What a checkpoint file holds."""

    state_dict: dict[str, torch.Tensor]  # the module's own when the file holds a pickled module
    module: Optional[nn.Module]  # the pickled module (unwrapped from DataParallel / a checkpoint entry), else None
    arch_names: tuple[
        tuple[str, str], ...
    ]  # (where, name): the 'arch' key, args.model (timm train.py), metadata 'arch'


def read_state_dict(path: Path, *, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """The state dict in the file at `path`: a raw state dict, a training checkpoint's, safetensors, or a
    pickled module's. ModelLoadError / UnsafePickleError when there is none or it may not be read."""
    return read_checkpoint(path, trust_pickle=trust_pickle).state_dict


def read_checkpoint(path: Path, *, trust_pickle: bool) -> CheckpointFile:
    """Read the file at `path` once: its pickled module or state dict, and the architecture names it stores."""
    obj, metadata = _read_file(path, trust_pickle=trust_pickle)
    module = _as_module(obj)
    if module is not None:
        return CheckpointFile(module.state_dict(), module, ())
    return CheckpointFile(_extract_state_dict(obj, path), None, _arch_names(obj, metadata))


def existing_checkpoint(path_text: str) -> Path:
    """The file a --checkpoint option names; ModelLoadError when it is missing or a directory."""
    path = Path(path_text).expanduser()
    if path.is_dir():
        raise ModelLoadError(f"checkpoint {path_text} is a directory, not a file")
    if not path.exists():
        raise ModelLoadError(f"no such checkpoint file: {path_text}")
    return check_input_file(path, "checkpoint")  # a FIFO or device is refused before it is opened


def _read_file(path: Path, *, trust_pickle: bool) -> tuple[Any, dict[str, str]]:
    """The object stored in `path` and, for safetensors, the file's metadata."""
    kind = _sniff(path)
    if kind == "safetensors" or (kind == "other" and path.suffix.lower() == ".safetensors"):
        return read_safetensors(path)
    return read_torch(path, kind, trust_pickle=trust_pickle), {}


def _sniff(path: Path) -> str:
    try:
        size = path.stat().st_size
        with open_input(path, "checkpoint") as handle:
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
    except Exception as err:
        raise ModelLoadError(
            f"{display_path(path)} is not a readable safetensors file (corrupt or truncated?): {error_reason(err)}"
        ) from err
    return tensors, metadata


# ----------------------------------------------------------------------------------------------------------
# State dicts


_CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
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


def _arch_names(obj: Any, metadata: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The architecture names a checkpoint stores, in the order they are trusted."""
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
    return tuple(found)


def _as_module(obj: Any) -> Optional[nn.Module]:
    """The nn.Module a loaded object is or wraps (DataParallel, a checkpoint's `model` entry); else None."""
    if isinstance(obj, Mapping):
        for key in ("model", "module", "state_dict"):
            if isinstance(obj.get(key), nn.Module):
                obj = obj[key]
                break
    if not isinstance(obj, nn.Module):
        return None
    while isinstance(obj, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        obj = obj.module
    return obj
