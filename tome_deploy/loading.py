"""Model loading: timm model names, state-dict checkpoints and pickled modules, safe by default.

Sources, in the order they are recognised:

* an existing file (or a missing path ending in .pt/.pth/.bin/.ckpt/.safetensors, which is an error):
  a state dict (raw, or inside a training checkpoint under `state_dict` / `model` / `state_dict_ema`),
  a safetensors file, or a `torch.save(model)` pickle;
* anything else is a timm model name, created with random weights (seeded), `--pretrained` weights,
  or the weights of `--checkpoint PATH`. `tome_digits_vit` (registered with timm by tome_deploy.digits)
  is the exception: without --checkpoint it loads the trained weights committed in tome_deploy/assets.

Files are only ever read. `torch.load` always runs with `weights_only=True`; a pickled module is
unpickled only when every global it needs is on the allowlist below (nn.Module and Enum classes
from torch/timm plus a few plain containers), unless the caller opts out with `trust_pickle=True`.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import importlib
import math
import operator
import pickle
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .errors import InvalidInputError, ModelLoadError, ToMeError, UnsafePickleError
from .patch import check_supported

__all__ = [
    "ALLOWED_GLOBALS",
    "ALLOWED_PACKAGES",
    "CHECKPOINT_SUFFIXES",
    "LoadedModel",
    "allowed_global",
    "load_model",
    "weights_fingerprint",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")

# Globals a pickle may name besides torch's own weights-only set. Classes from these packages are
# allowed when they are nn.Module or Enum subclasses: unpickling one only calls `cls.__new__`,
# `Module.__setstate__` or an Enum value lookup. Functions are never allowed: the weights-only
# unpickler lets a pickle *call* any allowlisted global with arguments of its choosing.
ALLOWED_PACKAGES = ("torch", "timm")
# Parts of torch whose modules carry code or process state (TorchScript, FX graphs, torch.package,
# DDP process groups): never allowed, even though their classes subclass nn.Module.
_DENIED_PREFIXES = (
    "torch.jit.", "torch.fx.", "torch.package.", "torch._dynamo.", "torch.export.", "torch.distributed.",
    "torch._C.", "torch.utils.", "torch.hub.", "torch.multiprocessing.", "torch.compiler.",
)
# Plain data holders a pickled timm model or a timm train.py checkpoint needs (found empirically by
# pickling every vision_transformer / deit / hybrid architecture of timm 1.0 and a train.py checkpoint).
ALLOWED_GLOBALS = frozenset({
    "collections.OrderedDict",  # nn.Module's _parameters/_buffers/_modules (already safe in torch)
    "builtins.set",  # (already safe in torch)
    "functools.partial",  # norm_layer=partial(LayerNorm, eps=...) kept as an attribute by some versions
    "argparse.Namespace",  # the `args` entry of a timm train.py checkpoint
    "timm.models._features.FeatureInfo",  # feature_info of hybrid (CNN-backbone) ViTs
})

_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # eval mode
    arch: Optional[str]  # timm architecture name when known
    weights: str  # one human line: where the weights came from
    random_weights: bool
    seed: Optional[int]


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def load_model(
    model: str,
    *,
    arch: Optional[str] = None,
    checkpoint: Optional[str] = None,
    pretrained: bool = False,
    img_size: Optional[int] = None,
    trust_pickle: bool = False,
    seed: int = 0,
) -> LoadedModel:
    """Load `model` (a timm name, a checkpoint file or a pickled module) as a supported ViT in eval mode.

    Raises ModelLoadError / UnsafePickleError (cannot or may not be loaded), UnsupportedModelError (not a
    timm VisionTransformer ToMe can rewrite) or InvalidInputError (bad img_size or conflicting arguments).
    """
    model = str(model)
    _check_img_size_value(img_size)
    img_size = None if img_size is None else operator.index(img_size)
    if pretrained and checkpoint:
        raise InvalidInputError("pass either --pretrained or --checkpoint PATH, not both")
    path = _as_file(model)
    if path is None:
        if arch and arch != model:
            raise InvalidInputError(
                f"--model {arch} names the architecture of a state-dict file, but {model} is a timm model name; "
                "drop --model"
            )
        loaded = _load_named(model, checkpoint=checkpoint, pretrained=pretrained, img_size=img_size,
                             trust_pickle=trust_pickle, seed=seed)
    else:
        if pretrained:
            raise InvalidInputError(f"--pretrained applies to a timm model name; {model} is a file that holds the weights")
        loaded = _load_file(path, arch=arch, checkpoint=checkpoint, img_size=img_size, trust_pickle=trust_pickle,
                            seed=seed)
    loaded.model.eval()
    return loaded


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 (hex) over the state dict: every entry's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        value = state[name]
        digest.update(_framed(name.encode()))
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            if tensor.is_sparse or tensor.layout != torch.strided:
                tensor = tensor.to_dense()
            tensor = tensor.cpu().contiguous()
            digest.update(_framed(str(tensor.dtype).encode()))
            digest.update(_framed(repr(tuple(tensor.shape)).encode()))
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            digest.update(struct.pack("<Q", data.nbytes))
            digest.update(memoryview(data))
        else:  # get_extra_state() payloads
            digest.update(_framed(b"object"))
            digest.update(_framed(repr(value).encode()))
    return digest.hexdigest()


def allowed_global(name: str) -> Optional[Any]:
    """The object a pickle global `module.qualname` stands for, when the allowlist admits it; else None."""
    if name not in ALLOWED_GLOBALS:
        if name.split(".", 1)[0] not in ALLOWED_PACKAGES or name.startswith(_DENIED_PREFIXES):
            return None
    obj = _resolve_global(name)
    if obj is None:
        return None
    if name in ALLOWED_GLOBALS:
        return obj
    if isinstance(obj, type) and (issubclass(obj, nn.Module) or issubclass(obj, enum.Enum)):
        return obj
    return None


# ----------------------------------------------------------------------------------------------------------
# timm model names


def _load_named(name: str, *, checkpoint: Optional[str], pretrained: bool, img_size: Optional[int],
                trust_pickle: bool, seed: int) -> LoadedModel:
    _require_timm_name(name)
    if checkpoint:
        ckpt_path = _existing_file(checkpoint, what="checkpoint")
        obj, _ = _read_file(ckpt_path, trust_pickle=trust_pickle)
        module = _as_module(obj)
        state_dict = module.state_dict() if module is not None else _extract_state_dict(obj, ckpt_path)
        model = _build(name, img_size=img_size, seed=seed, state_dict=state_dict)
        _load_weights(model, state_dict, source=str(ckpt_path), arch=name)
        return LoadedModel(model, name, f"checkpoint {_display(ckpt_path)}", random_weights=False, seed=None)
    bundled = _bundled_weights(name)
    if bundled is not None:  # a model tome_deploy ships trained weights for: those, with or without --pretrained
        weights_path, label = bundled
        state_dict, _ = _read_safetensors(weights_path)
        model = _build(name, img_size=img_size, seed=seed, state_dict=state_dict)
        _load_weights(model, state_dict, source=str(weights_path), arch=name)
        return LoadedModel(model, name, label, random_weights=False, seed=None)
    if pretrained:
        model = _build(name, img_size=img_size, seed=seed, pretrained=True)
        return LoadedModel(model, name, "pretrained (timm hub)", random_weights=False, seed=None)
    model = _build(name, img_size=img_size, seed=seed)
    return LoadedModel(model, name, f"random init (seed {seed}) — no pretrained weights", random_weights=True,
                       seed=seed)


def _bundled_weights(name: str) -> Optional[tuple[Path, str]]:
    """(file, description) of the trained weights tome_deploy ships for `name` (tome_digits_vit); else None."""
    from .digits import bundled_weights

    return bundled_weights(name)


def _is_timm_name(name: str) -> bool:
    import timm

    from . import digits  # noqa: F401 - registers tome_digits_vit with timm

    return name.startswith(_HUB_PREFIXES) or timm.is_model(name)


def _require_timm_name(name: str, *, flag: Optional[str] = None) -> None:
    """`flag` names the option the name came from (e.g. --model); None for the MODEL argument itself."""
    if _is_timm_name(name):
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


def _build(name: str, *, img_size: Optional[int], seed: int, pretrained: bool = False,
           state_dict: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """timm.create_model under a forked, seeded RNG, after a cheap check on the meta device that the
    architecture is supported and img_size fits it (so nothing is downloaded for a model we reject)."""
    import timm

    kwargs: dict[str, Any] = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if state_dict is not None:
        num_classes = _checkpoint_num_classes(state_dict)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes

    probe = _probe(name, kwargs)
    if probe is None and "img_size" in kwargs:
        # Some embeddings (hybrid CNN stems) assert on a bad size: judge the size on the default build.
        bare = _probe(name, {key: value for key, value in kwargs.items() if key != "img_size"})
        if bare is not None:
            check_supported(bare)
            _check_img_size(bare, img_size, name)
    if probe is not None:
        check_supported(probe)
        _check_img_size(probe, img_size, name)
        if img_size is None and state_dict is not None:
            native = _checkpoint_img_size(probe, state_dict)
            if native is not None:
                kwargs["img_size"] = native  # keep the resolution the checkpoint was trained at

    if pretrained and not name.startswith(_HUB_PREFIXES):
        from timm.models import is_model_pretrained

        if not is_model_pretrained(name):
            raise ModelLoadError(f"timm has no pretrained weights for {name}; pass --checkpoint PATH or drop --pretrained")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except ToMeError:
            raise
        except TypeError as err:
            raise _kwargs_error(name, kwargs, err) from err
        except Exception as err:  # noqa: BLE001 - anything timm or the hub raises becomes one line
            if pretrained:
                raise ModelLoadError(
                    f"pretrained weights for {name} could not be fetched ({_reason(err)}); download them where a "
                    "network is reachable, or pass --checkpoint PATH"
                ) from err
            raise ModelLoadError(f"timm could not create {name}: {_reason(err)}") from err
    check_supported(model)
    _check_img_size(model, img_size, name)
    return model


def _probe(name: str, kwargs: dict[str, Any]) -> Optional[nn.Module]:
    """The architecture built on the meta device (no memory, no init cost, no RNG); None when that fails."""
    import timm

    if name.startswith(_HUB_PREFIXES):
        return None
    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as err:
        raise _kwargs_error(name, kwargs, err) from err
    except Exception:  # noqa: BLE001 - the real build below reports it
        return None


def _kwargs_error(name: str, kwargs: dict[str, Any], err: TypeError) -> ToMeError:
    """An architecture that does not take img_size / num_classes is, in practice, not a ViT."""
    import timm

    if any(key in str(err) for key in kwargs):
        try:
            with torch.device("meta"):
                bare = timm.create_model(name, pretrained=False)
        except Exception:  # noqa: BLE001
            bare = None
        if bare is not None:
            check_supported(bare)  # raises UnsupportedModelError for CNNs and other families
        return InvalidInputError(f"{name} does not accept {', '.join(kwargs)}: {_reason(err)}")
    return ModelLoadError(f"timm could not create {name}: {_reason(err)}")


# ----------------------------------------------------------------------------------------------------------
# Files


def _as_file(model: str) -> Optional[Path]:
    """The path `model` names when it is a file source; None when it is a timm model name."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if _is_timm_name(model):
            return None
        raise ModelLoadError(f"{model} is a directory; pass a checkpoint file ({'/'.join(CHECKPOINT_SUFFIXES)}) or a timm model name")
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"no such file: {model}")
    if path.exists():
        raise ModelLoadError(f"{model} is not a regular file")
    return None


def _existing_file(path_text: str, *, what: str) -> Path:
    path = Path(path_text).expanduser()
    if path.is_dir():
        raise ModelLoadError(f"{what} {path_text} is a directory, not a file")
    if not path.is_file():
        raise ModelLoadError(f"no such {what} file: {path_text}")
    return path


def _load_file(path: Path, *, arch: Optional[str], checkpoint: Optional[str], img_size: Optional[int],
               trust_pickle: bool, seed: int) -> LoadedModel:
    obj, file_metadata = _read_file(path, trust_pickle=trust_pickle)
    module = _as_module(obj)
    if module is not None:
        return _from_module(module, path, checkpoint=checkpoint, img_size=img_size, trust_pickle=trust_pickle)
    if checkpoint:
        raise InvalidInputError(
            f"--checkpoint applies to a timm model name or a pickled module; {_display(path)} already holds the "
            "weights (use --model ARCH to name its architecture)"
        )
    state_dict = _extract_state_dict(obj, path)
    name = _checkpoint_arch(arch, obj, file_metadata, path)
    model = _build(name, img_size=img_size, seed=seed, state_dict=state_dict)
    _load_weights(model, state_dict, source=str(path), arch=name)
    return LoadedModel(model, name, f"checkpoint {_display(path)}", random_weights=False, seed=None)


def _from_module(module: nn.Module, path: Path, *, checkpoint: Optional[str], img_size: Optional[int],
                 trust_pickle: bool) -> LoadedModel:
    check_supported(module)
    arch = _module_arch(module)
    weights = f"pickled module {_display(path)}"
    if img_size is not None and tuple(module.patch_embed.img_size) != (img_size, img_size):
        _check_img_size(module, img_size, arch or type(module).__name__)
        if not hasattr(module, "set_input_size"):
            raise InvalidInputError(
                f"{_display(path)} was pickled at image size {tuple(module.patch_embed.img_size)} and this timm "
                f"version cannot resize it to {img_size}; drop --img-size"
            )
        try:
            module.set_input_size(img_size=(img_size, img_size))
        except Exception as err:  # noqa: BLE001
            raise InvalidInputError(f"cannot resize {_display(path)} to image size {img_size}: {_reason(err)}") from err
    if checkpoint:
        ckpt_path = _existing_file(checkpoint, what="checkpoint")
        obj, _ = _read_file(ckpt_path, trust_pickle=trust_pickle)
        other = _as_module(obj)
        state_dict = other.state_dict() if other is not None else _extract_state_dict(obj, ckpt_path)
        _load_weights(module, state_dict, source=str(ckpt_path), arch=arch or type(module).__name__)
        weights = f"checkpoint {_display(ckpt_path)} (into pickled module {_display(path)})"
    return LoadedModel(module, arch, weights, random_weights=False, seed=None)


def _module_arch(module: nn.Module) -> Optional[str]:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(module, attr, None)
        if isinstance(cfg, Mapping) and isinstance(cfg.get("architecture"), str):
            return cfg["architecture"]
    return None


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


def _read_file(path: Path, *, trust_pickle: bool) -> tuple[Any, dict[str, str]]:
    """The object stored in `path` and, for safetensors, the file's metadata."""
    kind = _sniff(path)
    if kind == "safetensors" or (kind == "other" and path.suffix.lower() == ".safetensors"):
        return _read_safetensors(path)
    return _read_torch(path, kind, trust_pickle=trust_pickle), {}


def _sniff(path: Path) -> str:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError as err:
        raise ModelLoadError(f"cannot read {_display(path)}: {err.strerror or err}") from err
    if size == 0:
        raise ModelLoadError(f"{_display(path)} is empty (0 bytes); the file is truncated or was never written")
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    return "other"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # noqa: BLE001 - SafetensorError, OSError, ...
        raise ModelLoadError(
            f"{_display(path)} is not a readable safetensors file (corrupt or truncated?): {_reason(err)}"
        ) from err
    return tensors, metadata


def _read_torch(path: Path, kind: str, *, trust_pickle: bool) -> Any:
    if kind == "zip":
        return _read_torch_zip(path, trust_pickle=trust_pickle)
    return _read_torch_legacy(path, trust_pickle=trust_pickle)


def _read_torch_zip(path: Path, *, trust_pickle: bool) -> Any:
    shown = _display(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ModelLoadError(f"{shown} is corrupt or truncated: not a readable zip archive ({_reason(err)})") from err
    if any("/code/" in name or name.endswith("constants.pkl") for name in names):
        raise ModelLoadError(
            f"{shown} is a TorchScript archive (torch.jit.save), which is not supported: pass the eager module "
            "(torch.save(model)) or its state dict (torch.save(model.state_dict()))"
        )
    if not any(name.endswith("data.pkl") for name in names):
        raise ModelLoadError(f"{shown} is a zip archive but not a PyTorch checkpoint (no data.pkl inside)")
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{shown} is not a readable PyTorch checkpoint (corrupt or truncated?): {_reason(err)}") from err
    allowed, offending = _split_globals(needed)
    if offending:
        if not trust_pickle:
            raise _unsafe_error(shown, offending)
        return _torch_load_unsafe(path)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if trust_pickle:
            return _torch_load_unsafe(path)
        raise UnsafePickleError(
            f"{shown} cannot be loaded with weights_only=True ({_reason(err)}); if you trust the file, re-run "
            "with --trust-pickle"
        ) from err
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{shown} is not a readable PyTorch checkpoint (corrupt or truncated?): {_reason(err)}") from err


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _read_torch_legacy(path: Path, *, trust_pickle: bool) -> Any:
    """Pre-1.6 (non-zip) torch.save files: no up-front scan exists, so allowlisted globals are added
    one refusal at a time."""
    shown = _display(path)
    allowed: list[Any] = []
    for _ in range(256):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            match = _GLOBAL_IN_MESSAGE.search(str(err))
            if match is None and (allowed or "persistent_load" in str(err)):
                # A legacy pickled module: its records cannot be read by the weights-only unpickler at all.
                if trust_pickle:
                    return _torch_load_unsafe(path)
                raise UnsafePickleError(
                    f"{shown} is a legacy (pre-zip) torch.save pickle of Python objects, which weights-only loading "
                    "cannot read; re-save it with a current torch (or save a state dict), or re-run with "
                    "--trust-pickle only if you trust the file"
                ) from err
            if match is None:
                raise ModelLoadError(
                    f"{shown} is not a PyTorch checkpoint: neither a zip archive nor a readable pickle "
                    "(corrupt, truncated, or another format)"
                ) from err
            name = match.group(1)
            name = name if "." in name else f"builtins.{name}"
            obj = allowed_global(name)
            if obj is None or obj in allowed:
                if trust_pickle:
                    return _torch_load_unsafe(path)
                raise _unsafe_error(shown, [name]) from err
            allowed.append(obj)
        except Exception as err:  # noqa: BLE001 - EOFError, RuntimeError, UnicodeDecodeError, ...
            raise ModelLoadError(
                f"{shown} is not a PyTorch checkpoint: neither a zip archive nor a readable pickle ({_reason(err)})"
            ) from err
    raise ModelLoadError(f"{shown} needs too many pickle globals to load safely; re-run with --trust-pickle if you trust it")


def _torch_load_unsafe(path: Path) -> Any:
    shown = _display(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as err:
        raise ModelLoadError(
            f"{shown} needs Python code that is not importable here ({_reason(err)}); run where the module that "
            "defined the pickled classes is importable, or save a state dict instead"
        ) from err
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"{shown} could not be unpickled: {_reason(err)}") from err


def _split_globals(names: list[str]) -> tuple[list[Any], list[str]]:
    allowed, offending = [], []
    for name in names:
        obj = allowed_global(name)
        if obj is None:
            offending.append(name)
        else:
            allowed.append(obj)
    return allowed, offending


def _unsafe_error(shown: str, offending: list[str]) -> UnsafePickleError:
    return UnsafePickleError(
        f"{shown} is a pickle that needs globals outside the allowlist (nn.Module/Enum classes of "
        f"{'/'.join(ALLOWED_PACKAGES)} and a few containers): {', '.join(sorted(offending))}; unpickling it can run "
        "arbitrary code, so re-run with --trust-pickle only if you trust the file"
    )


def _resolve_global(name: str) -> Optional[Any]:
    """Import `module.qualname` (longest importable module prefix, then attributes)."""
    parts = name.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - ImportError and anything a broken import raises
            continue
        try:
            for attr in parts[split:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


# ----------------------------------------------------------------------------------------------------------
# State dicts


_CHECKPOINT_KEYS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    shown = _display(path)
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


def _checkpoint_arch(arch: Optional[str], obj: Any, metadata: Mapping[str, str], path: Path) -> str:
    """--model ARCH, else the checkpoint's `arch` key / `args.model` (timm train.py), else safetensors metadata."""
    if arch:
        _require_timm_name(arch, flag="--model")
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
        if _is_timm_name(name):
            return name
    shown = _display(path)
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


def _checkpoint_num_classes(state_dict: Mapping[str, Any]) -> Optional[int]:
    """Classifier width stored in the checkpoint: head.weight rows, 0 for a headless checkpoint."""
    state_dict = _strip_prefixes(state_dict)
    head = state_dict.get("head.weight")
    if isinstance(head, torch.Tensor) and head.ndim == 2:
        return int(head.shape[0])
    if "pos_embed" in state_dict and not any(key.startswith("head.") for key in state_dict):
        return 0
    return None


def _checkpoint_img_size(model: nn.Module, state_dict: Mapping[str, Any]) -> Optional[int]:
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


def _load_weights(model: nn.Module, state_dict: Mapping[str, Any], *, source: str, arch: str) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    shown = _display(Path(source))
    state_dict = _strip_prefixes(state_dict)
    try:
        state_dict = checkpoint_filter_fn(state_dict, model, adapt_layer_scale=True)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(f"checkpoint {shown} does not match the architecture {arch}: {_reason(err)}") from err
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
        raise ModelLoadError(f"checkpoint {shown} does not match the architecture {arch}: {_reason(err)}") from err


# ----------------------------------------------------------------------------------------------------------
# Image size


def _check_img_size_value(img_size: Optional[int]) -> None:
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


def _check_img_size(model: nn.Module, img_size: Optional[int], arch: str) -> None:
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


# ----------------------------------------------------------------------------------------------------------
# Small helpers


def _framed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def _display(path: Path) -> str:
    try:
        return str(path.expanduser().resolve())
    except OSError:
        return str(path)


def _reason(err: BaseException) -> str:
    """The first line of an exception message, trimmed: enough to act on, never a traceback."""
    text = str(err).strip()
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"missing key {err.args[0]!r}"
    first = text.splitlines()[0] if text else ""
    first = re.sub(r"\x1b\[[0-9;]*m", "", first)
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
