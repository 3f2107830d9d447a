"""Model loading: timm model names, state-dict checkpoints and pickled modules, safe by default.

Sources, in the order they are recognised:

* an existing file (or a missing path ending in .pt/.pth/.bin/.ckpt/.safetensors, which is an error):
  a state dict (raw, or inside a training checkpoint under `state_dict` / `model` / `state_dict_ema`),
  a safetensors file, or a `torch.save(model)` pickle;
* anything else is a timm model name, created with random weights (seeded), `--pretrained` weights,
  or the weights of `--checkpoint PATH`. A name whose timm pretrained config points at a local `file`
  that exists loads those weights without --pretrained (nothing to download): that is how
  `tome_digits_vit` (tome_deploy/models/digits.py) gets the trained weights committed in tome_deploy/assets.

Files are only ever read. `torch.load` always runs with `weights_only=True`; a pickled module is
unpickled only when every global it needs is on the allowlist below (nn.Module and Enum classes
from torch/timm plus a few plain containers), unless the caller opts out with `trust_pickle=True`."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tome_deploy.errors import (
    InvalidInputError,
    ModelLoadError,
    ToMeError,
    display_path,
    error_reason,
)
from tome_deploy.models.loading.checkpoint import (
    CHECKPOINT_SUFFIXES,
    HUB_PREFIXES,
    check_img_size,
    checkpoint_arch,
    checkpoint_img_size,
    checkpoint_num_classes,
    extract_state_dict,
    is_timm_name,
    load_weights,
    read_file,
    require_timm_name,
)
from tome_deploy.models.loading.source import ModelSource
from tome_deploy.models.adapter import adapter_for


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module  # eval mode
    arch: Optional[str]  # timm architecture name when known
    weights: str  # one human line: where the weights came from; files by name only (it goes into artifacts)
    random_weights: bool
    seed: Optional[int]


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def load_model(source: ModelSource | str, **options) -> LoadedModel:
    """Load `source` (a ModelSource, or a name/path with ModelSource's fields as keywords) as a supported
    model in eval mode.

    Raises ModelLoadError / UnsafePickleError (cannot or may not be loaded), UnsupportedModelError (not a
    model ToMe can rewrite) or InvalidInputError (bad img_size or conflicting arguments).
    """
    if not isinstance(source, ModelSource):
        source = ModelSource(source, **options)
    elif options:
        raise TypeError("pass a ModelSource or keyword options, not both")
    model, arch, checkpoint, img_size = source.name, source.arch, source.checkpoint, source.img_size
    family_loaded = _load_other_family(source)
    if family_loaded is not None:
        return family_loaded
    path = _as_file(model)
    if path is None:
        if arch and arch != model:
            raise InvalidInputError(
                f"--model {arch} names the architecture of a state-dict file, but {model} is a timm model name; "
                "drop --model"
            )
        loaded = _load_named(model, checkpoint=checkpoint, pretrained=source.pretrained, img_size=img_size,
                             trust_pickle=source.trust_pickle, seed=source.seed)
    else:
        if source.pretrained:
            raise InvalidInputError(f"--pretrained applies to a timm model name; {model} is a file that holds the weights")
        loaded = _load_file(path, arch=arch, checkpoint=checkpoint, img_size=img_size, trust_pickle=source.trust_pickle,
                            seed=source.seed)
    loaded.model.eval()
    return loaded






# ----------------------------------------------------------------------------------------------------------
# Hugging Face folders / hf:<id> and open_clip:<arch>


def _load_other_family(source: ModelSource) -> Optional[LoadedModel]:
    """The model when `source` names a Hugging Face or OpenCLIP model; None for timm names and files."""
    from tome_deploy.models.hf_transformers import HUB_PREFIX, is_hf_folder, load_hf
    from tome_deploy.models.open_clip_visual import PREFIX as OPEN_CLIP_PREFIX
    from tome_deploy.models.open_clip_visual import load_open_clip

    name = source.name
    if name.startswith(OPEN_CLIP_PREFIX):
        if source.pretrained:
            raise InvalidInputError(f"{name}: OpenCLIP weights are given with --checkpoint PATH (no hub is used)")
        state = None
        if source.checkpoint:
            ckpt_path = _existing_file(source.checkpoint, what="checkpoint")
            obj, _ = read_file(ckpt_path, trust_pickle=source.trust_pickle)
            state = extract_state_dict(obj, ckpt_path)
        visual = load_open_clip(name, checkpoint_state=state, img_size=source.img_size, seed=source.seed)
        adapter_for(visual)
        if state is not None:
            return LoadedModel(visual, name, f"checkpoint {Path(source.checkpoint).name}", random_weights=False, seed=None)
        return LoadedModel(visual, name, f"random init (seed {source.seed}) — no pretrained weights", random_weights=True,
                           seed=source.seed)
    if name.startswith(HUB_PREFIX) or is_hf_folder(Path(name).expanduser()):
        if source.checkpoint or source.arch:
            raise InvalidInputError(f"{name} is a Hugging Face model: its folder holds config and weights; drop --checkpoint and --model")
        model, weights = load_hf(str(Path(name).expanduser()) if not name.startswith(HUB_PREFIX) else name,
                                 pretrained=source.pretrained)
        native = adapter_for(model).data_config(model)["input_size"][-1]
        if source.img_size is not None and source.img_size != native:
            raise InvalidInputError(f"{name} is configured for {native} px images; drop --img-size {source.img_size} "
                                    "(change image_size in its config.json to export another size)")
        return LoadedModel(model, type(model.hf).__name__, weights, random_weights=False, seed=None)
    return None


# ----------------------------------------------------------------------------------------------------------
# timm model names


def _load_named(name: str, *, checkpoint: Optional[str], pretrained: bool, img_size: Optional[int],
                trust_pickle: bool, seed: int) -> LoadedModel:
    require_timm_name(name)
    if checkpoint:
        ckpt_path = _existing_file(checkpoint, what="checkpoint")
        obj, _ = read_file(ckpt_path, trust_pickle=trust_pickle)
        module = _as_module(obj)
        state_dict = module.state_dict() if module is not None else extract_state_dict(obj, ckpt_path)
        model = _build(name, img_size=img_size, seed=seed, state_dict=state_dict)
        load_weights(model, state_dict, source=str(ckpt_path), arch=name)
        return LoadedModel(model, name, f"checkpoint {ckpt_path.name}", random_weights=False, seed=None)
    local = _local_pretrained_file(name)
    if local is not None:  # the pretrained config names a file on disk: those weights, nothing to fetch
        model = _build(name, img_size=img_size, seed=seed, pretrained=True)
        return LoadedModel(model, name, f"local pretrained weights {local.name} (timm pretrained_cfg)",
                           random_weights=False, seed=None)
    if pretrained:
        model = _build(name, img_size=img_size, seed=seed, pretrained=True)
        return LoadedModel(model, name, "pretrained (timm hub)", random_weights=False, seed=None)
    model = _build(name, img_size=img_size, seed=seed)
    return LoadedModel(model, name, f"random init (seed {seed}) — no pretrained weights", random_weights=True,
                       seed=seed)


def _local_pretrained_file(name: str) -> Optional[Path]:
    """The existing local file timm's pretrained config of `name` loads its weights from; else None."""
    if name.startswith(HUB_PREFIXES):
        return None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    file = getattr(cfg, "file", None)
    return Path(file) if file and Path(file).is_file() else None


def _build(name: str, *, img_size: Optional[int], seed: int, pretrained: bool = False,
           state_dict: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """timm.create_model under a forked, seeded RNG, after a cheap check on the meta device that the
    architecture is supported and img_size fits it (so nothing is downloaded for a model we reject)."""
    import timm

    kwargs: dict[str, Any] = {}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if state_dict is not None:
        num_classes = checkpoint_num_classes(state_dict)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes

    probe = _probe(name, kwargs)
    if probe is None and "img_size" in kwargs:
        # Some embeddings (hybrid CNN stems) assert on a bad size: judge the size on the default build.
        bare = _probe(name, {key: value for key, value in kwargs.items() if key != "img_size"})
        if bare is not None:
            adapter_for(bare)
            check_img_size(bare, img_size, name)
    if probe is not None:
        adapter_for(probe)
        check_img_size(probe, img_size, name)
        if img_size is None and state_dict is not None:
            native = checkpoint_img_size(probe, state_dict)
            if native is not None:
                kwargs["img_size"] = native  # keep the resolution the checkpoint was trained at

    if pretrained and not name.startswith(HUB_PREFIXES):
        from timm.models import is_model_pretrained

        if not is_model_pretrained(name):
            raise ModelLoadError(f"timm has no pretrained weights for {name}; pass --checkpoint PATH or drop --pretrained")

    offline = pretrained and _hub_unreachable()
    with torch.random.fork_rng(devices=[]), _hub_offline(offline):
        torch.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except ToMeError:
            raise
        except TypeError as err:
            raise _kwargs_error(name, kwargs, err) from err
        except Exception as err:  # noqa: BLE001 - anything timm or the hub raises becomes one line
            if offline:
                raise ModelLoadError(
                    f"pretrained weights for {name} are not in the local cache and the hub ({_hub_host()}) cannot be "
                    "reached; download them where a network is reachable, or pass --checkpoint PATH"
                ) from err
            if pretrained:
                raise ModelLoadError(
                    f"pretrained weights for {name} could not be fetched ({error_reason(err)}); download them where a "
                    "network is reachable, or pass --checkpoint PATH"
                ) from err
            raise ModelLoadError(f"timm could not create {name}: {error_reason(err)}") from err
    adapter_for(model)
    check_img_size(model, img_size, name)
    return model


HUB_RESOLVE_TIMEOUT_S = 3.0


def _hub_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def _hub_unreachable() -> bool:
    """True when the hub's host name does not resolve within a few seconds (no network, no DNS)."""
    resolved: list[bool] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(_hub_host(), 443)
            resolved.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(HUB_RESOLVE_TIMEOUT_S)
    return not resolved


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """Hugging Face Hub offline mode (HF_HUB_OFFLINE) for this call: weights come from the local cache, or
    the call fails at once instead of retrying an unreachable host for a minute."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def _probe(name: str, kwargs: dict[str, Any]) -> Optional[nn.Module]:
    """The architecture built on the meta device (no memory, no init cost, no RNG); None when that fails."""
    import timm

    if name.startswith(HUB_PREFIXES):
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
            adapter_for(bare)  # raises UnsupportedModelError for CNNs and other families
        return InvalidInputError(f"{name} does not accept {', '.join(kwargs)}: {error_reason(err)}")
    return ModelLoadError(f"timm could not create {name}: {error_reason(err)}")


# ----------------------------------------------------------------------------------------------------------
# Files


def _as_file(model: str) -> Optional[Path]:
    """The path `model` names when it is a file source; None when it is a timm model name."""
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if is_timm_name(model):
            return None
        raise ModelLoadError(f"{model} is a directory without config.json; pass a checkpoint file ({'/'.join(CHECKPOINT_SUFFIXES)}), "
                             "a timm model name, or a Hugging Face save_pretrained folder")
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
    obj, file_metadata = read_file(path, trust_pickle=trust_pickle)
    module = _as_module(obj)
    if module is not None:
        return _from_module(module, path, checkpoint=checkpoint, img_size=img_size, trust_pickle=trust_pickle)
    if checkpoint:
        raise InvalidInputError(
            f"--checkpoint applies to a timm model name or a pickled module; {display_path(path)} already holds the "
            "weights (use --model ARCH to name its architecture)"
        )
    state_dict = extract_state_dict(obj, path)
    name = checkpoint_arch(arch, obj, file_metadata, path)
    model = _build(name, img_size=img_size, seed=seed, state_dict=state_dict)
    load_weights(model, state_dict, source=str(path), arch=name)
    return LoadedModel(model, name, f"checkpoint {path.name}", random_weights=False, seed=None)


def _from_module(module: nn.Module, path: Path, *, checkpoint: Optional[str], img_size: Optional[int],
                 trust_pickle: bool) -> LoadedModel:
    adapter_for(module)
    arch = _module_arch(module)
    weights = f"pickled module {path.name}"
    if img_size is not None and tuple(module.patch_embed.img_size) != (img_size, img_size):
        check_img_size(module, img_size, arch or type(module).__name__)
        if not hasattr(module, "set_input_size"):
            raise InvalidInputError(
                f"{display_path(path)} was pickled at image size {tuple(module.patch_embed.img_size)} and this timm "
                f"version cannot resize it to {img_size}; drop --img-size"
            )
        try:
            module.set_input_size(img_size=(img_size, img_size))
        except Exception as err:  # noqa: BLE001
            raise InvalidInputError(f"cannot resize {display_path(path)} to image size {img_size}: {error_reason(err)}") from err
    if checkpoint:
        ckpt_path = _existing_file(checkpoint, what="checkpoint")
        obj, _ = read_file(ckpt_path, trust_pickle=trust_pickle)
        other = _as_module(obj)
        state_dict = other.state_dict() if other is not None else extract_state_dict(obj, ckpt_path)
        load_weights(module, state_dict, source=str(ckpt_path), arch=arch or type(module).__name__)
        weights = f"checkpoint {ckpt_path.name} (into pickled module {path.name})"
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
