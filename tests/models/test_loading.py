"""load_model / weights_fingerprint: timm names, state dicts, safetensors, pickles, and every refusal.

All files are written to tmp_path from small randomly initialised timm models (no network needed).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from tome_deploy.errors import (
    InvalidInputError,
    ModelLoadError,
    UnsafePickleError,
    UnsupportedModelError,
)
from tome_deploy.models.loading import timm_source
from tome_deploy.models.loading.dispatch import LoadedModel, load_model
from tome_deploy.models.loading.fingerprint import weights_fingerprint
from tome_deploy.models.loading.safe_pickle import allowed_global
from tome_deploy.models.loading.source import ModelSource

ARCH = "test_vit"  # patch 16, a few hundred thousand parameters
SIZE = 64


def make_source(seed: int = 3, img_size: int = SIZE, arch: str = ARCH, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, img_size=img_size, **kwargs).eval()


def same_outputs(a: nn.Module, b: nn.Module, img_size: int = SIZE) -> bool:
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source() -> nn.Module:
    return make_source()


@pytest.fixture
def sd_file(tmp_path, source) -> Path:
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    return path


class TaggedViT(VisionTransformer):
    """A user subclass: pickles as a global outside torch/timm."""


class Note:
    """A plain user class hung on a module as an attribute."""

    def __init__(self, text: str):
        self.text = text


# ---------------------------------------------------------------------------------------------------------
# timm names


def test_name_random_init_is_seeded_and_leaves_global_rng_alone():
    rng_before = torch.get_rng_state()
    a = load_model(ARCH, img_size=SIZE, seed=0)
    b = load_model(ARCH, img_size=SIZE, seed=0)
    c = load_model(ARCH, img_size=SIZE, seed=1)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert isinstance(a, LoadedModel)
    assert a.random_weights and a.seed == 0 and a.arch == ARCH
    assert a.weights == "random init (seed 0) — no pretrained weights"
    assert not a.model.training
    assert weights_fingerprint(a.model) == weights_fingerprint(b.model)
    assert weights_fingerprint(a.model) != weights_fingerprint(c.model)
    assert tuple(a.model.patch_embed.img_size) == (SIZE, SIZE)


def test_fingerprint_sees_names_dtypes_and_bytes(source):
    ref = weights_fingerprint(source)
    assert len(ref) == 64 and ref == weights_fingerprint(source)
    changed = copy.deepcopy(source)
    with torch.no_grad():
        changed.head.bias[0] += 1e-6
    assert weights_fingerprint(changed) != ref
    assert weights_fingerprint(copy.deepcopy(source).double()) != ref


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ModelLoadError) as info:
        load_model("vit_tiny_patch16_22")
    message = str(info.value)
    assert "vit_tiny_patch16_22" in message and "vit_tiny_patch16_224" in message and "exist" in message


def test_non_vit_name_is_unsupported():
    with pytest.raises(UnsupportedModelError):
        load_model("resnet18")
    with pytest.raises(UnsupportedModelError):  # ResNet takes no img_size: still reported as unsupported
        load_model("resnet18", img_size=SIZE)


def test_explicit_default_img_size_gives_the_same_weights():
    """tome-validate passes the exported size explicitly; the random init must not depend on that."""
    default = load_model(ARCH).model
    explicit = load_model(ARCH, img_size=int(default.patch_embed.img_size[0])).model
    assert weights_fingerprint(default) == weights_fingerprint(explicit)


def test_hybrid_vit_img_size_uses_the_backbone_stride():
    with pytest.raises(InvalidInputError, match="patch size 32 .*use 32 or 64"):
        load_model("vit_tiny_r_s16_p8_224", img_size=48)


@pytest.mark.parametrize("size", [0, -16, 64.5, "64"])
def test_non_positive_img_size(size):
    with pytest.raises(InvalidInputError, match="positive"):
        load_model(ARCH, img_size=size)


def test_img_size_not_a_multiple_of_the_patch():
    with pytest.raises(InvalidInputError) as info:
        load_model(ARCH, img_size=100)
    message = str(info.value)
    assert "100" in message and "16" in message and "96" in message and "112" in message


def test_pretrained_fetch_failure_points_at_checkpoint(monkeypatch):
    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("Name or service not known")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    monkeypatch.setattr(timm_source, "hub_unreachable", lambda: False)  # the hub resolves, the fetch fails
    with pytest.raises(ModelLoadError) as info:
        load_model(ARCH, pretrained=True, img_size=SIZE)
    assert "could not be fetched" in str(info.value) and "--checkpoint" in str(info.value)


def test_name_with_checkpoint(sd_file, source):
    loaded = load_model(ARCH, checkpoint=str(sd_file), img_size=SIZE)
    assert not loaded.random_weights and loaded.seed is None
    assert loaded.weights == f"checkpoint {sd_file.name}"
    assert same_outputs(loaded.model, source)
    assert weights_fingerprint(loaded.model) == weights_fingerprint(source)


def test_conflicting_arguments(sd_file):
    with pytest.raises(InvalidInputError):
        load_model(ARCH, checkpoint=str(sd_file), pretrained=True)
    with pytest.raises(InvalidInputError):
        load_model(str(sd_file), arch=ARCH, pretrained=True)
    with pytest.raises(InvalidInputError):
        load_model(str(sd_file), arch=ARCH, checkpoint=str(sd_file))


# ---------------------------------------------------------------------------------------------------------
# State dicts


def test_state_dict_with_model_flag(sd_file, source):
    before = file_digest(sd_file)
    loaded = load_model(str(sd_file), arch=ARCH, img_size=SIZE)
    assert loaded.arch == ARCH and not loaded.random_weights
    assert loaded.weights == f"checkpoint {sd_file.name}"
    assert not loaded.model.training
    assert same_outputs(loaded.model, source)
    assert file_digest(sd_file) == before  # files are only read


def test_state_dict_keeps_its_trained_image_size(sd_file, source):
    """Without img_size the model takes the resolution the checkpoint's pos_embed was trained at."""
    loaded = load_model(str(sd_file), arch=ARCH)
    assert tuple(loaded.model.patch_embed.img_size) == (SIZE, SIZE)
    assert same_outputs(loaded.model, source)


def test_state_dict_without_arch_asks_for_model_flag(sd_file):
    with pytest.raises(ModelLoadError, match="--model"):
        load_model(str(sd_file))


def test_training_checkpoint_with_arch_key(tmp_path, source):
    path = tmp_path / "checkpoint.pth.tar.ckpt"
    torch.save({"arch": ARCH, "epoch": 7, "state_dict": source.state_dict(), "optimizer": {"lr": 0.1}}, path)
    loaded = load_model(str(path), img_size=SIZE)
    assert loaded.arch == ARCH and same_outputs(loaded.model, source)


def test_timm_train_checkpoint_uses_args_model(tmp_path, source):
    """timm's train.py stores arch=type(model).__name__.lower() and the real name in args.model."""
    path = tmp_path / "last.pth"
    args = argparse.Namespace(model=ARCH, lr=0.05, sched="cosine", img_size=None)
    torch.save(
        {
            "arch": "visiontransformer",
            "args": args,
            "version": 2,
            "state_dict": source.state_dict(),
            "state_dict_ema": source.state_dict(),
        },
        path,
    )
    loaded = load_model(str(path), img_size=SIZE)  # argparse.Namespace is allowlisted
    assert loaded.arch == ARCH and same_outputs(loaded.model, source)


def test_checkpoint_arch_that_is_not_a_timm_name(tmp_path, source):
    path = tmp_path / "ckpt.pt"
    torch.save({"arch": "visiontransformer", "model": source.state_dict()}, path)
    with pytest.raises(ModelLoadError, match="--model"):
        load_model(str(path))
    assert same_outputs(load_model(str(path), arch=ARCH).model, source)  # the 'model' key (DeiT style)


def test_data_parallel_prefix(tmp_path, source):
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    assert same_outputs(load_model(str(path), arch=ARCH, img_size=SIZE).model, source)


def test_img_size_change_resamples_pos_embed(sd_file, source):
    loaded = load_model(str(sd_file), arch=ARCH, img_size=96)
    model = loaded.model
    assert model.pos_embed.shape[1] == (96 // 16) ** 2 + model.num_prefix_tokens
    assert source.pos_embed.shape[1] == (SIZE // 16) ** 2 + source.num_prefix_tokens
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 96)).shape == (1, source.num_classes)


def test_fine_tuned_head_width_is_taken_from_the_checkpoint(tmp_path):
    source = make_source(num_classes=10)
    path = tmp_path / "ft.pth"
    torch.save(source.state_dict(), path)
    loaded = load_model(str(path), arch=ARCH, img_size=SIZE)
    assert loaded.model.num_classes == 10 and same_outputs(loaded.model, source)


def test_mismatched_checkpoint(sd_file):
    with pytest.raises(ModelLoadError) as info:
        load_model(str(sd_file), arch="test_vit2", img_size=SIZE)
    message = str(info.value)
    assert "does not match" in message and "test_vit2" in message
    assert "missing keys" in message and "unexpected keys" in message and "--model" in message


def test_shape_mismatch(tmp_path, source):
    state = dict(source.state_dict())
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 64)
    path = tmp_path / "wrong_shape.pth"
    torch.save(state, path)
    with pytest.raises(
        ModelLoadError, match=r"shape mismatch \(checkpoint vs model\): blocks.0.mlp.fc1.weight \(7, 64\)"
    ):
        load_model(str(path), arch=ARCH, img_size=SIZE)


def test_unknown_model_flag(sd_file):
    with pytest.raises(ModelLoadError, match="--model test_vti is not a timm model name; did you mean test_vit"):
        load_model(str(sd_file), arch="test_vti")


def test_dict_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "notes": "hello"}, path)
    with pytest.raises(ModelLoadError, match="not a state dict"):
        load_model(str(path), arch=ARCH)
    tensor_path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_path)
    with pytest.raises(ModelLoadError, match="neither a state dict nor an nn.Module"):
        load_model(str(tensor_path), arch=ARCH)


def test_legacy_format_state_dict(tmp_path, source):
    path = tmp_path / "legacy.pt"
    torch.save(source.state_dict(), path, _use_new_zipfile_serialization=False)
    assert same_outputs(load_model(str(path), arch=ARCH, img_size=SIZE).model, source)


# ---------------------------------------------------------------------------------------------------------
# safetensors


def test_safetensors_with_metadata_arch(tmp_path, source):
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path), metadata={"arch": ARCH, "format": "pt"})
    before = file_digest(path)
    loaded = load_model(str(path), img_size=SIZE)
    assert loaded.arch == ARCH and loaded.weights == f"checkpoint {path.name}"
    assert same_outputs(loaded.model, source)
    assert file_digest(path) == before


def test_safetensors_without_metadata(tmp_path, source):
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    with pytest.raises(ModelLoadError, match="--model"):
        load_model(str(path))
    assert same_outputs(load_model(str(path), arch=ARCH, img_size=SIZE).model, source)


def test_safetensors_as_checkpoint_of_a_name(tmp_path, source):
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), str(path))
    assert same_outputs(load_model(ARCH, checkpoint=str(path), img_size=SIZE).model, source)


# ---------------------------------------------------------------------------------------------------------
# Pickled modules


def test_pickled_timm_module_loads_without_trust(tmp_path, source):
    path = tmp_path / "module.pt"
    torch.save(source, path)
    before = file_digest(path)
    loaded = load_model(str(path))
    assert type(loaded.model) is VisionTransformer and loaded.model is not source
    assert loaded.arch == ARCH and loaded.weights == f"pickled module {path.name}"
    assert not loaded.random_weights and loaded.seed is None
    assert same_outputs(loaded.model, source)
    assert weights_fingerprint(loaded.model) == weights_fingerprint(source)
    assert file_digest(path) == before


def test_pickled_module_in_train_mode_comes_back_in_eval_mode(tmp_path, source):
    path = tmp_path / "train_mode.pt"
    torch.save(copy.deepcopy(source).train(), path)
    assert not load_model(str(path)).model.training


def test_pickled_module_resized_to_img_size(tmp_path, source):
    path = tmp_path / "module.pt"
    torch.save(source, path)
    model = load_model(str(path), img_size=96).model
    assert tuple(model.patch_embed.img_size) == (96, 96)
    assert model.pos_embed.shape[1] == 36 + model.num_prefix_tokens
    with pytest.raises(InvalidInputError, match="96 or 112"):
        load_model(str(path), img_size=100)


def test_pickled_module_with_a_user_subclass(tmp_path, source):
    model = copy.deepcopy(source)
    model.__class__ = TaggedViT
    path = tmp_path / "tagged.pt"
    torch.save(model, path)
    with pytest.raises(UnsafePickleError) as info:
        load_model(str(path))
    message = str(info.value)
    assert f"{TaggedViT.__module__}.TaggedViT" in message and "--trust-pickle" in message
    assert isinstance(info.value, ModelLoadError)
    loaded = load_model(str(path), trust_pickle=True)
    assert isinstance(loaded.model, TaggedViT) and same_outputs(loaded.model, source)


def test_pickled_module_with_a_user_attribute(tmp_path, source):
    model = copy.deepcopy(source)
    model.note = Note("fine-tuned on my data")
    path = tmp_path / "noted.pt"
    torch.save(model, path)
    with pytest.raises(UnsafePickleError, match=f"{Note.__module__}.Note"):
        load_model(str(path))
    loaded = load_model(str(path), trust_pickle=True)
    assert loaded.model.note.text == "fine-tuned on my data"


class Payload:
    """Unpickling this runs os.makedirs: the code-execution case weights-only loading exists for."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_malicious_pickle_runs_nothing(tmp_path, source):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": source.state_dict(), "arch": ARCH, "extra": Payload(str(marker))}, path)
    with pytest.raises(UnsafePickleError, match="makedirs"):
        load_model(str(path))
    assert not marker.exists()


def test_allowlist():
    assert allowed_global("torch.nn.modules.linear.Linear") is nn.Linear
    assert allowed_global("timm.models.vision_transformer.VisionTransformer") is VisionTransformer
    assert allowed_global("timm.layers.format.Format") is not None  # an Enum
    assert allowed_global("collections.OrderedDict") is not None
    assert allowed_global("argparse.Namespace") is argparse.Namespace
    for name in (
        "os.system",
        "builtins.eval",
        "torch.load",
        "torch.hub.load",
        "timm.create_model",
        "torch.jit._script.RecursiveScriptModule",
        "torch.fx.graph_module.GraphModule",
        "torch.utils.cpp_extension.load_inline",
        "timm.no_such_thing.Foo",
        f"{__name__}.TaggedViT",
    ):
        assert allowed_global(name) is None, name


def test_legacy_pickled_module_needs_trust(tmp_path, source):
    path = tmp_path / "legacy_module.pt"
    torch.save(source, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafePickleError, match="--trust-pickle"):
        load_model(str(path))
    assert same_outputs(load_model(str(path), trust_pickle=True).model, source)


def test_pickled_non_vit_is_unsupported(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(timm.create_model("test_resnet"), path)
    with pytest.raises(UnsupportedModelError):
        load_model(str(path))


def test_pickled_data_parallel_is_unwrapped(tmp_path, source):
    path = tmp_path / "dp_module.pt"
    torch.save(nn.DataParallel(copy.deepcopy(source)), path)
    assert same_outputs(load_model(str(path)).model, source)


# ---------------------------------------------------------------------------------------------------------
# Files that are not checkpoints


def test_torchscript_is_refused(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Linear(4, 2)), str(path))
    with pytest.raises(ModelLoadError, match="TorchScript"):
        load_model(str(path))


def test_missing_file():
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model("/nonexistent/folder/model.safetensors")
    with pytest.raises(ModelLoadError, match="no such checkpoint file"):
        load_model(ARCH, checkpoint="/nonexistent/weights.pth")


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".bin", ".safetensors"])
def test_random_bytes(tmp_path, suffix):
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path), arch=ARCH)
    assert str(path.resolve()) in str(info.value)
    assert "\n" not in str(info.value)


def test_a_pickle_that_claims_more_bytes_than_the_file_holds(tmp_path):
    """Random bytes often parse as a pickle opcode with a huge length: reading it must not allocate it."""
    path = tmp_path / "claims.pt"
    path.write_bytes(b"\x80\x04\x8e" + (2**62).to_bytes(8, "little") + b"\x00" * 64)  # PROTO 4, BYTES8 of 4 EiB
    with pytest.raises(ModelLoadError) as info:
        load_model(str(path), arch=ARCH)
    assert "claims.pt" in str(info.value) and "\n" not in str(info.value)


def test_truncated_files(tmp_path, source):
    whole = tmp_path / "whole.pt"
    torch.save(source, whole)
    data = whole.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated"):
        load_model(str(cut))
    st = tmp_path / "whole.safetensors"
    save_file(source.state_dict(), str(st), metadata={"arch": ARCH})
    st_cut = tmp_path / "cut.safetensors"
    st_cut.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(ModelLoadError, match="cut.safetensors"):
        load_model(str(st_cut))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="empty"):
        load_model(str(empty), arch=ARCH)


def test_plain_pickle_that_is_not_torch(tmp_path):
    path = tmp_path / "plain.pkl.bin"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}))
    with pytest.raises(ModelLoadError):
        load_model(str(path), arch=ARCH)


# ---------------------------------------------------------------------------------------------------------
# The loading flow


def package_visits(call) -> tuple[list[str], set[tuple[str, str]]]:
    """While `call()` runs: the tome_deploy source files (names only) in the order control enters them, one
    entry per visit (a visit lasts while any frame of the file is on the stack, so a file calling its own
    helpers, or code elsewhere that returns to it, is one visit), and every (caller, callee) pair of files
    where a frame of one started a frame of the other."""
    package = Path(load_model.__code__.co_filename).resolve().parents[2]  # the tome_deploy folder under test
    visits: list[str] = []
    calls: set[tuple[str, str]] = set()
    open_frames: dict[str, int] = {}

    def file_of(frame) -> Optional[str]:
        path = Path(frame.f_code.co_filename)
        return path.name if package in path.parents else None

    def record(frame, event, arg) -> None:
        name = file_of(frame) if event in ("call", "return") else None
        if name is None:
            return
        if event == "return":
            open_frames[name] -= 1
            return
        if not open_frames.get(name):
            visits.append(name)
        open_frames[name] = open_frames.get(name, 0) + 1
        caller = frame.f_back
        while caller is not None and file_of(caller) is None:
            caller = caller.f_back  # through library frames (importlib, torch) to the package code that called
        if caller is not None and file_of(caller) != name:
            calls.add((file_of(caller), name))

    sys.setprofile(record)
    try:
        call()
    finally:
        sys.setprofile(None)
    return visits, calls


def test_a_state_dict_load_enters_dispatch_and_checkpoint_once(sd_file):
    """Dispatch picks the source form, whose loader does the whole job: the dispatcher never calls the
    checkpoint code (nor it the dispatcher), and reading the file (checkpoint.py) is one visit, not a
    back-and-forth."""
    source = ModelSource(str(sd_file), arch=ARCH, img_size=SIZE)
    load_model(source)  # imports every module first: an import runs module code, which would count as a visit
    visits, calls = package_visits(lambda: load_model(source))
    assert visits.count("dispatch.py") == 1 and visits.count("checkpoint.py") == 1, visits
    assert visits.index("dispatch.py") < visits.index("checkpoint.py")
    assert not {("dispatch.py", "checkpoint.py"), ("checkpoint.py", "dispatch.py")} & calls, sorted(calls)


def test_loading_a_timm_checkpoint_imports_no_other_family_library(sd_file):
    """Picking the source form is string and file checks: transformers and open_clip stay unimported."""
    code = (
        "import sys\n"
        "from tome_deploy.models.loading.dispatch import load_model\n"
        f"load_model({str(sd_file)!r}, arch={ARCH!r}, img_size={SIZE})\n"
        "print(sorted(m for m in ('transformers', 'open_clip') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
