"""The timm source form: timm model names and checkpoint / pickled-module files. It is the fallback,
tried after every other family's form (loading/dispatch.py), so it claims every source left.

* an existing file (or a missing path ending in .pt/.pth/.bin/.ckpt/.safetensors, which is an error):
  a state dict (raw, or inside a training checkpoint under `state_dict` / `model` / `state_dict_ema`),
  a safetensors file, or a `torch.save(model)` pickle, read safely by loading/checkpoint.py;
* anything else is a timm model name, created with random weights (seeded), `--pretrained` weights,
  or the weights of `--checkpoint PATH`. A name whose timm pretrained config points at a local `file`
  that exists loads those weights without --pretrained (nothing to download): that is how
  `tome_digits_vit` (tome_deploy/models/digits.py) gets the trained weights committed in tome_deploy/assets.

The architecture, and --img-size against its patch size, are checked on the meta device before the real
build (so nothing is downloaded for a model that is refused); a state dict is then adapted to the model:
key prefixes stripped, the classifier width and the trained image size taken from it, position
embeddings resampled by timm's checkpoint_filter_fn."""

from __future__ import annotations

import contextlib
import difflib
import math
import socket
import threading
from collections.abc import Mapping
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
from tome_deploy.models.adapter import ModelAdapter, adapter_for
from tome_deploy.models.loading.checkpoint import (
    CHECKPOINT_SUFFIXES,
    existing_checkpoint,
    read_checkpoint,
    read_state_dict,
)
from tome_deploy.models.loading.source import LoadedModel, ModelSource, SourceForm

HUB_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")  # timm names that point at a hub or a local folder


def claims(source: ModelSource) -> bool:
    """Every source: the forms before this one have claimed theirs."""
    return True


def load(source: ModelSource) -> LoadedModel:
    """A timm model name, or a checkpoint / pickled-module file, as a LoadedModel."""
    path = _as_file(source.name)
    if path is None:
        return _load_named(source)
    return _load_file(path, source)


SOURCE_FORM = SourceForm("timm model name or checkpoint file", claims, load)


# ----------------------------------------------------------------------------------------------------------
# timm model names


def _load_named(source: ModelSource) -> LoadedModel:
    name, img_size, seed = source.name, source.img_size, source.seed
    if source.arch and source.arch != name:
        raise InvalidInputError(
            f"--model {source.arch} names the architecture of a state-dict file, but {name} is a timm model name; "
            "drop --model"
        )
    require_timm_name(name)
    if source.checkpoint:
        ckpt_path = existing_checkpoint(source.checkpoint)
        state_dict = read_state_dict(ckpt_path, trust_pickle=source.trust_pickle)
        model, adapter = _build(name, img_size=img_size, seed=seed, state_dict=state_dict)
        load_weights(model, state_dict, source=str(ckpt_path), arch=name)
        return LoadedModel(model, adapter, name, f"checkpoint {ckpt_path.name}", random_weights=False, seed=None)
    local = _local_pretrained_file(name)
    if local is not None:  # the pretrained config names a file on disk: those weights, nothing to fetch
        model, adapter = _build(name, img_size=img_size, seed=seed, pretrained=True)
        return LoadedModel(
            model,
            adapter,
            name,
            f"local pretrained weights {local.name} (timm pretrained_cfg)",
            random_weights=False,
            seed=None,
        )
    if source.pretrained:
        model, adapter = _build(name, img_size=img_size, seed=seed, pretrained=True)
        return LoadedModel(model, adapter, name, "pretrained (timm hub)", random_weights=False, seed=None)
    model, adapter = _build(name, img_size=img_size, seed=seed)
    return LoadedModel(
        model, adapter, name, f"random init (seed {seed}) — no pretrained weights", random_weights=True, seed=seed
    )


def _local_pretrained_file(name: str) -> Optional[Path]:
    """The existing local file timm's pretrained config of `name` loads its weights from; else None."""
    if name.startswith(HUB_PREFIXES):
        return None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    file = getattr(cfg, "file", None)
    return Path(file) if file and Path(file).is_file() else None


def _build(
    name: str,
    *,
    img_size: Optional[int],
    seed: int,
    pretrained: bool = False,
    state_dict: Optional[Mapping[str, Any]] = None,
) -> tuple[nn.Module, ModelAdapter]:
    """(timm.create_model under a forked, seeded RNG, its adapter), after a cheap check on the meta device
    that the architecture is supported and img_size fits it (so nothing is downloaded for a model we
    reject). The adapter is found once: on the meta build when there is one, else on the model."""
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
    adapter = None if probe is None else adapter_for(probe)
    if probe is not None:
        check_img_size(probe, img_size, name)
        if img_size is None and state_dict is not None:
            native = checkpoint_img_size(probe, state_dict)
            if native is not None:
                kwargs["img_size"] = native  # keep the resolution the checkpoint was trained at

    if pretrained and not name.startswith(HUB_PREFIXES):
        from timm.models import is_model_pretrained

        if not is_model_pretrained(name):
            raise ModelLoadError(
                f"timm has no pretrained weights for {name}; pass --checkpoint PATH or drop --pretrained"
            )

    offline = pretrained and hub_unreachable()
    with torch.random.fork_rng(devices=[]), hub_offline(offline):
        torch.manual_seed(seed)
        try:
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
        except ToMeError:
            raise
        except TypeError as err:
            raise _kwargs_error(name, kwargs, err) from err
        except Exception as err:
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
    if adapter is None:
        adapter = adapter_for(model)
    check_img_size(model, img_size, name)
    return model, adapter


HUB_RESOLVE_TIMEOUT_S = 3.0


def _hub_host() -> str:
    from urllib.parse import urlparse

    from huggingface_hub import constants

    return urlparse(constants.ENDPOINT).hostname or "huggingface.co"


def hub_unreachable() -> bool:
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
def hub_offline(offline: bool):
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
        raise ModelLoadError(
            f"{model} is a directory without config.json; pass a checkpoint file ({'/'.join(CHECKPOINT_SUFFIXES)}), "
            "a timm model name, or a Hugging Face save_pretrained folder"
        )
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise ModelLoadError(f"no such file: {model}")
    if path.exists():
        raise ModelLoadError(f"{model} is not a regular file")
    return None


def _load_file(path: Path, source: ModelSource) -> LoadedModel:
    if source.pretrained:
        raise InvalidInputError(
            f"--pretrained applies to a timm model name; {source.name} is a file that holds the weights"
        )
    checkpoint = read_checkpoint(path, trust_pickle=source.trust_pickle)
    if checkpoint.module is not None:
        return _from_module(checkpoint.module, path, source)
    if source.checkpoint:
        raise InvalidInputError(
            f"--checkpoint applies to a timm model name or a pickled module; {display_path(path)} already holds the "
            "weights (use --model ARCH to name its architecture)"
        )
    name = checkpoint_arch(source.arch, checkpoint.arch_names, path)
    model, adapter = _build(name, img_size=source.img_size, seed=source.seed, state_dict=checkpoint.state_dict)
    load_weights(model, checkpoint.state_dict, source=str(path), arch=name)
    return LoadedModel(model, adapter, name, f"checkpoint {path.name}", random_weights=False, seed=None)


def _from_module(module: nn.Module, path: Path, source: ModelSource) -> LoadedModel:
    adapter = adapter_for(module)
    arch = _module_arch(module)
    weights = f"pickled module {path.name}"
    img_size = source.img_size
    if img_size is not None and tuple(module.patch_embed.img_size) != (img_size, img_size):
        check_img_size(module, img_size, arch or type(module).__name__)
        if not hasattr(module, "set_input_size"):
            raise InvalidInputError(
                f"{display_path(path)} was pickled at image size {tuple(module.patch_embed.img_size)} and this timm "
                f"version cannot resize it to {img_size}; drop --img-size"
            )
        try:
            module.set_input_size(img_size=(img_size, img_size))
        except Exception as err:
            raise InvalidInputError(
                f"cannot resize {display_path(path)} to image size {img_size}: {error_reason(err)}"
            ) from err
    if source.checkpoint:
        ckpt_path = existing_checkpoint(source.checkpoint)
        state_dict = read_state_dict(ckpt_path, trust_pickle=source.trust_pickle)
        load_weights(module, state_dict, source=str(ckpt_path), arch=arch or type(module).__name__)
        weights = f"checkpoint {ckpt_path.name} (into pickled module {path.name})"
    return LoadedModel(module, adapter, arch, weights, random_weights=False, seed=None)


def _module_arch(module: nn.Module) -> Optional[str]:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(module, attr, None)
        if isinstance(cfg, Mapping) and isinstance(cfg.get("architecture"), str):
            return cfg["architecture"]
    return None


def checkpoint_arch(arch: Optional[str], arch_names: tuple[tuple[str, str], ...], path: Path) -> str:
    """--model ARCH, else the first timm name among those the checkpoint stores (`CheckpointFile.arch_names`)."""
    if arch:
        require_timm_name(arch, flag="--model")
        return arch
    for _, name in arch_names:
        if is_timm_name(name):
            return name
    shown = display_path(path)
    if arch_names:
        where, name = arch_names[0]
        raise ModelLoadError(
            f"the {where} of {shown} is '{name}', not a timm model name; pass --model ARCH to name the timm "
            "architecture (e.g. --model vit_base_patch16_224)"
        )
    raise ModelLoadError(
        f"{shown} is a state dict without an 'arch' key; pass --model ARCH to name its timm architecture "
        "(e.g. --model vit_base_patch16_224)"
    )


# ----------------------------------------------------------------------------------------------------------
# State dicts into a timm model


def _strip_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the `module.` (DataParallel/DDP) and `_orig_mod.` (torch.compile) key prefixes."""
    out = dict(state_dict)
    changed = True
    while changed and out:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(key.startswith(prefix) for key in out):
                out = {key[len(prefix) :]: value for key, value in out.items()}
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
    except Exception as err:
        raise ModelLoadError(f"checkpoint {shown} does not match the architecture {arch}: {error_reason(err)}") from err
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict
        and isinstance(state_dict[key], torch.Tensor)
        and isinstance(expected[key], torch.Tensor)
        and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch (checkpoint vs model)", mismatched),
        ):
            if items:
                more = f" and {len(items) - 5} more" if len(items) > 5 else ""
                problems.append(f"{label}: {', '.join(items[:5])}{more}")
        raise ModelLoadError(
            f"checkpoint {shown} does not match the architecture {arch}: {'; '.join(problems)}; pass the --model "
            "ARCH the checkpoint was trained with"
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except Exception as err:
        raise ModelLoadError(f"checkpoint {shown} does not match the architecture {arch}: {error_reason(err)}") from err


# ----------------------------------------------------------------------------------------------------------
# Image size and names


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
