"""Reading torch.save files safely: weights_only=True, and a pickled module only when every global it
needs is on the allowlist (nn.Module and Enum classes from torch/timm plus a few plain containers),
unless the caller opts out with trust_pickle=True.

Before anything is unpickled, a zip checkpoint's CRCs are checked (one read of the file, so flipped bytes are
refused instead of becoming silently wrong weights) and the pickle is scanned for calls of module classes:
a real `torch.save(model)` rebuilds modules with `cls.__new__` and their saved state, never by calling the
constructor, so a pickle that calls one (`torch.nn.Linear(100000, 100000)` would allocate 40 GB before any
check) is refused. What a weights-only load can then allocate is bounded by the tensors stored in the file."""

from __future__ import annotations

import enum
import importlib
import pickle
import pickletools
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from tome_deploy.errors import (
    ModelLoadError,
    UnsafePickleError,
    display_path,
    error_reason,
)

# Globals a pickle may name besides torch's own weights-only set. Classes from these packages are
# allowed when they are nn.Module or Enum subclasses: unpickling one only calls `cls.__new__`,
# `Module.__setstate__` or an Enum value lookup. Functions are never allowed: the weights-only
# unpickler lets a pickle *call* any allowlisted global with arguments of its choosing.
ALLOWED_PACKAGES = ("torch", "timm")
# Parts of torch whose modules carry code or process state (TorchScript, FX graphs, torch.package,
# DDP process groups): never allowed, even though their classes subclass nn.Module.
_DENIED_PREFIXES = (
    "torch.jit.",
    "torch.fx.",
    "torch.package.",
    "torch._dynamo.",
    "torch.export.",
    "torch.distributed.",
    "torch._C.",
    "torch.utils.",
    "torch.hub.",
    "torch.multiprocessing.",
    "torch.compiler.",
)
# Plain data holders a pickled timm model or a timm train.py checkpoint needs (found empirically by
# pickling every vision_transformer / deit / hybrid architecture of timm 1.0 and a train.py checkpoint).
ALLOWED_GLOBALS = frozenset(
    {
        "collections.OrderedDict",  # nn.Module's _parameters/_buffers/_modules (already safe in torch)
        "builtins.set",  # (already safe in torch)
        "functools.partial",  # norm_layer=partial(LayerNorm, eps=...) kept as an attribute by some versions
        "argparse.Namespace",  # the `args` entry of a timm train.py checkpoint
        "timm.models._features.FeatureInfo",  # feature_info of hybrid (CNN-backbone) ViTs
    }
)


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


_STRING_OPS = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8"}
)
_MARK = object()


class _BoundedStream:
    """`limit` bytes of a binary stream. An opcode that claims more data than is left (random bytes read as
    a pickle claim gigabytes) ends the scan as a malformed pickle instead of allocating what it claims."""

    def __init__(self, stream, limit: int):
        self._stream, self._left = stream, limit

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > self._left:
            raise EOFError("the pickle claims more data than the file holds")
        data = self._stream.read(size)
        self._left -= len(data)
        return data

    def readline(self) -> bytes:
        line = self._stream.readline(self._left)
        self._left -= len(line)
        return line


def module_constructor_calls(stream) -> list[str]:
    """Names of the nn.Module classes one pickle (read from `stream` up to its STOP) calls with REDUCE.

    A symbolic run of the opcode stack: only where globals, strings and memo entries go is tracked; the
    cost is one pass over the pickle's opcodes, and nothing is constructed."""
    stack: list[Any] = []
    memo: dict[Any, Any] = {}
    calls: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in ("GLOBAL", "INST"):
                stack.append(("global", str(arg).replace(" ", ".")))
            elif name == "STACK_GLOBAL":
                qualname, module = stack.pop(), stack.pop()
                stack.append(("global", f"{module[1]}.{qualname[1]}") if module and qualname else None)
            elif name in _STRING_OPS:
                stack.append(("str", arg))
            elif name == "REDUCE":
                stack.pop()
                func = stack.pop()
                if func and func[0] == "global" and _is_module_class(func[1]):
                    calls.append(func[1])
                stack.append(None)
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg))
            elif name == "DUP":
                stack.append(stack[-1])
            elif name == "MARK":
                stack.append(_MARK)
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                count = int(name[-1])
                items = tuple(stack[-count:])
                del stack[-count:]
                stack.append(("tuple", items))
            elif name in ("BINPERSID", "PERSID"):
                # legacy files name a module class as the persistent id ("module", cls, source)
                pid = stack.pop() if name == "BINPERSID" else None
                stack.append(pid[1][1] if pid and pid[0] == "tuple" and len(pid[1]) > 1 else None)
            else:
                _generic_stack_effect(stack, opcode)
    except (ValueError, IndexError, TypeError, EOFError):
        pass  # a malformed pickle: the unpickler refuses it with its own message
    return calls


def _generic_stack_effect(stack: list[Any], opcode) -> None:
    before = opcode.stack_before
    items: list[Any] = []
    if pickletools.markobject in before:
        while (item := stack.pop()) is not _MARK:
            items.insert(0, item)
        below = before.index(pickletools.markobject)
    else:
        below = len(before)
    for _ in range(below):
        stack.pop()
    if opcode.name == "TUPLE":
        stack.append(("tuple", tuple(items)))
    else:
        stack.extend([None] * len(opcode.stack_after))


def _is_module_class(name: str) -> bool:
    obj = allowed_global(name)
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def _refuse_constructor_calls(shown: str, calls: list[str]) -> None:
    if calls:
        raise UnsafePickleError(
            f"{shown} calls module constructors while unpickling ({', '.join(sorted(set(calls))[:3])}), which "
            "torch.save never writes and which can allocate without bound; save the model with torch.save(model) "
            "or its state dict, or re-run with --trust-pickle only if you trust the file"
        )


def _check_zip_crcs(archive: zipfile.ZipFile, shown: str) -> None:
    """Read every member once against its CRC-32 (torch.load does not check them)."""
    try:
        bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error, NotImplementedError) as err:
        raise ModelLoadError(
            f"{shown} is corrupt: its zip archive cannot be read ({error_reason(err)}); "
            "re-download or re-save the checkpoint"
        ) from err
    if bad is not None:
        raise ModelLoadError(
            f"{shown} is corrupt: {bad} inside the zip archive fails its CRC check (flipped or "
            "damaged bytes); re-download or re-save the checkpoint"
        )


def read_torch(path: Path, kind: str, *, trust_pickle: bool) -> Any:
    if kind == "zip":
        return _read_torch_zip(path, trust_pickle=trust_pickle)
    return _read_torch_legacy(path, trust_pickle=trust_pickle)


def _read_torch_zip(path: Path, *, trust_pickle: bool) -> Any:
    shown = display_path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise ModelLoadError(
            f"{shown} is corrupt or truncated: not a readable zip archive ({error_reason(err)})"
        ) from err
    with archive:
        names = archive.namelist()
        _check_zip_crcs(archive, shown)
        pickles = [name for name in names if name.endswith("data.pkl")]
        calls = (
            []
            if trust_pickle or not pickles
            else module_constructor_calls(
                _BoundedStream(archive.open(pickles[0]), archive.getinfo(pickles[0]).file_size)
            )
        )
    if any("/code/" in name or name.endswith("constants.pkl") for name in names):
        raise ModelLoadError(
            f"{shown} is a TorchScript archive (torch.jit.save), which is not supported: pass the eager module "
            "(torch.save(model)) or its state dict (torch.save(model.state_dict()))"
        )
    if not pickles:
        raise ModelLoadError(f"{shown} is a zip archive but not a PyTorch checkpoint (no data.pkl inside)")
    _refuse_constructor_calls(shown, calls)
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as err:
        raise ModelLoadError(
            f"{shown} is not a readable PyTorch checkpoint (corrupt or truncated?): {error_reason(err)}"
        ) from err
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
            f"{shown} cannot be loaded with weights_only=True ({error_reason(err)}); if you trust the file, re-run "
            "with --trust-pickle"
        ) from err
    except Exception as err:
        raise ModelLoadError(
            f"{shown} is not a readable PyTorch checkpoint (corrupt or truncated?): {error_reason(err)}"
        ) from err


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _read_torch_legacy(path: Path, *, trust_pickle: bool) -> Any:
    """Pre-1.6 (non-zip) torch.save files: no up-front scan exists, so allowlisted globals are added
    one refusal at a time."""
    shown = display_path(path)
    if not trust_pickle:
        _refuse_constructor_calls(shown, _legacy_constructor_calls(path))
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
        except Exception as err:
            raise ModelLoadError(
                f"{shown} is not a PyTorch checkpoint: neither a zip archive nor a readable pickle ({error_reason(err)})"
            ) from err
    raise ModelLoadError(
        f"{shown} needs too many pickle globals to load safely; re-run with --trust-pickle if you trust it"
    )


def _legacy_constructor_calls(path: Path) -> list[str]:
    """The legacy format is four pickles (magic number, protocol, system info, the object) and raw storages."""
    calls: list[str] = []
    with open(path, "rb") as file:
        stream = _BoundedStream(file, path.stat().st_size)
        for _ in range(4):
            calls += module_constructor_calls(stream)
    return calls


def _torch_load_unsafe(path: Path) -> Any:
    shown = display_path(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except (ImportError, AttributeError) as err:
        raise ModelLoadError(
            f"{shown} needs Python code that is not importable here ({error_reason(err)}); run where the module that "
            "defined the pickled classes is importable, or save a state dict instead"
        ) from err
    except Exception as err:
        raise ModelLoadError(f"{shown} could not be unpickled: {error_reason(err)}") from err


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
