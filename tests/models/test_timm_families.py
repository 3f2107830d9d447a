"""apply_tome on timm ViT families, checked against the plain reference forward (tests/reference_tome.py).

Random weights (no downloads), re-initialised with larger values than timm's init so that attention is
far from uniform, LayerScale gammas are ~0.1 and logits are O(1): every layer's choices matter.
"""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from reference_tome import (
    reference_clamp,
    reference_schedule,
    reference_tome_features,
    reference_tome_forward,
)
from timm.models.vision_transformer import (
    Attention,
    Block,
    ParallelScalingBlock,
    ResPostBlock,
    VisionTransformer,
)
from torch import nn

from tome_deploy.errors import InvalidInputError, ToMeError, UnsupportedModelError
from tome_deploy.models import timm_vit
from tome_deploy.models.adapter import describe
from tome_deploy.models.patch import apply_tome, tome_blocks, track_sources

BATCH = 2


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma":  # LayerScale
                param.copy_(0.05 + 0.1 * torch.rand(param.shape, generator=gen))
            elif leaf == "weight" and param.dim() >= 2:  # Linear / Conv
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=gen) * 1.5 / fan_in**0.5)
            elif leaf == "weight":  # norm scales
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=gen))
            elif leaf == "bias":
                param.copy_(0.1 * torch.randn(param.shape, generator=gen))
            else:  # cls/dist/reg tokens, pos_embed, MAP latent
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
    return model.eval()


# name -> (builder, image size (H, W), schedules to try with r > 0)
FAMILIES = {
    "vit_tiny": (
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=80, depth=4, num_classes=10),
        (80, 80),
        [2, 6, (4, -1), [12, 0, 3]],
    ),
    "test_vit": (lambda: timm.create_model("test_vit", img_size=96), (96, 96), [3, (5, -1), 18]),
    "deit_distilled": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=4, num_classes=10),
        (64, 64),
        [2, (3, -1), 8],
    ),
    "deit3_layerscale": (
        lambda: timm.create_model("deit3_small_patch16_224", img_size=64, depth=2, num_classes=10),
        (64, 64),
        [3, (6, -1)],
    ),
    "qk_norm": (
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=10, qk_norm=True),
        (64, 64),
        [2, (3, -1), 8],
    ),
    "registers4": (
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, depth=4, num_classes=10, reg_tokens=4),
        (64, 64),
        [2, (3, -1), 8],
    ),
    "cls_plus_1_register": (  # p = 2 with the register (not a distillation token) at position 1
        lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, depth=3, num_classes=10, reg_tokens=1),
        (64, 64),
        [3, 8],
    ),
    "test_vit2_meanpool_reg": (lambda: timm.create_model("test_vit2", img_size=64), (64, 64), [2, (2, -1)]),
    "test_vit3_map": (lambda: timm.create_model("test_vit3", img_size=64), (64, 64), [1, (2, -1)]),
    "test_vit4_rmsnorm": (lambda: timm.create_model("test_vit4", img_size=64), (64, 64), [2]),
    "no_prefix_avg": (  # p = 0: unmerged A tokens stay in score order
        lambda: VisionTransformer(
            img_size=48,
            patch_size=8,
            embed_dim=32,
            depth=3,
            num_heads=2,
            class_token=False,
            global_pool="avg",
            num_classes=5,
        ),
        (48, 48),
        [4, (6, -1), 18],
    ),
    "patch8_rect_depth3": (  # non-default patch 8, non-square 56x40 image (7x5 grid + cls = 36 tokens), depth 3
        lambda: VisionTransformer(
            img_size=(56, 40),
            patch_size=8,
            embed_dim=48,
            depth=3,
            num_heads=4,
            num_classes=7,
            qkv_bias=False,
        ),
        (56, 40),
        [5, (7, -1), [17, 4]],
    ),
    "scale_norm": (
        lambda: VisionTransformer(
            img_size=40,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            num_classes=5,
            scale_attn_norm=True,
            scale_mlp_norm=True,
        ),
        (40, 40),
        [4],
    ),
}
FAMILY_NAMES = list(FAMILIES)
SCHEDULE_CASES = [(name, spec) for name in FAMILY_NAMES for spec in FAMILIES[name][2]]


@functools.cache
def base_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_(FAMILIES[name][0](), seed=FAMILY_NAMES.index(name) + 1)


@functools.cache
def pixels(name: str) -> torch.Tensor:
    height, width = FAMILIES[name][1]
    return torch.randn(BATCH, 3, height, width, generator=torch.Generator().manual_seed(7))


def model_copy(name: str, fused: bool = True) -> nn.Module:
    model = copy.deepcopy(base_model(name))
    set_fused(model, fused)
    return model


def set_fused(model: nn.Module, fused: bool) -> nn.Module:
    """Pick timm's attention path (SDPA or the manual softmax) in every ViT Attention of `model`."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = fused
    return model


@functools.cache
def reference(name: str, spec_key: str):
    spec = eval(spec_key)
    model = base_model(name)
    r_layers = reference_schedule(spec, len(model.blocks))
    feats = reference_tome_features(model, pixels(name), r_layers)
    logits = feats["model"].forward_head(feats["tokens"]).float()
    return feats, logits


def features(model, x):
    return model.forward_features(x)


# ---------------------------------------------------------------------------------------------
# The reference itself (it must agree with timm when nothing merges)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_reference_at_r0_equals_timm(name):
    model = base_model(name)
    with torch.no_grad():
        want = model(pixels(name))
    got = reference_tome_forward(model, pixels(name), [0] * len(model.blocks))
    assert want.abs().max() > 0.1  # logits are not trivially small
    # timm's fused SDPA and the reference's explicit softmax round differently; on some CPUs (MAP pooling)
    # the difference reaches 1.03e-5 on logits of ~2, so the budget has a relative part.
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (a) r = 0 is the unpatched model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_r0_equals_unpatched(name):
    model = model_copy(name)
    tome, schedule = apply_tome(model, 0)
    assert schedule.effective == (0,) * len(model.blocks)
    x = pixels(name)
    for fused in (True, False):  # the ToMe copy reads attn.fused_attn at run time
        set_fused(model, fused), set_fused(tome, fused)
        with torch.no_grad():
            want, got = model(x), tome(x)
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5, f"fused_attn={fused}"


# ---------------------------------------------------------------------------------------------
# (b) r > 0 equals the reference forward; (c) scatter and matmul agree
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,spec", SCHEDULE_CASES, ids=[f"{n}-{s}" for n, s in SCHEDULE_CASES])
def test_tome_equals_reference(name, spec):
    model = base_model(name)
    feats, want_logits = reference(name, repr(spec))
    tome, schedule = apply_tome(model, spec)
    assert list(schedule.effective) == feats["r_effective"]
    assert sum(schedule.effective) > 0
    x = pixels(name)
    want_tokens = feats["tokens"].float()
    for fused in (True, False):
        set_fused(tome, fused)
        with torch.no_grad():
            got_tokens = features(tome, x)
            got_logits = tome.forward_head(got_tokens)
            direct = tome(x)
        message = f"fused_attn={fused}"
        assert got_tokens.shape == want_tokens.shape == (BATCH, schedule.tokens[-1], model.embed_dim)
        # the same tokens in the same order, then the same logits
        torch.testing.assert_close(
            got_tokens, want_tokens, rtol=0, atol=1e-4, msg=lambda m, message=message: f"{message}: {m}"
        )
        torch.testing.assert_close(
            got_logits, want_logits, rtol=0, atol=1e-4, msg=lambda m, message=message: f"{message}: {m}"
        )
        torch.testing.assert_close(
            direct, want_logits, rtol=0, atol=1e-4, msg=lambda m, message=message: f"{message}: {m}"
        )


@pytest.mark.parametrize("name,spec", SCHEDULE_CASES[::2], ids=[f"{n}-{s}" for n, s in SCHEDULE_CASES[::2]])
def test_scatter_and_matmul_agree(name, spec):
    model = base_model(name)
    x = pixels(name)
    tome_scatter, _ = apply_tome(model, spec, "scatter")
    tome_matmul, _ = apply_tome(model, spec, "matmul")
    with torch.no_grad():
        a, b = features(tome_scatter, x), features(tome_matmul, x)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        torch.testing.assert_close(tome_scatter(x), tome_matmul(x), rtol=0, atol=1e-5)
    # and the matmul form is not just agreeing with a wrong answer
    feats, _ = reference(name, repr(spec))
    torch.testing.assert_close(b, feats["tokens"].float(), rtol=0, atol=1e-4)


def constant_keys_(model: nn.Module, seed: int) -> nn.Module:
    """Make every key of every block the same +-1/0 vector (16 non-zeros: norm 4, so all cosine
    similarities are exactly 1 in any precision and any summation order). Every score of every layer
    then ties exactly and the tie rules alone decide all merges; queries, values and sizes (through
    proportional attention) still shape the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            heads, dim = attn.num_heads, attn.qkv.weight.shape[0] // 3
            head_dim = dim // heads
            pattern = torch.zeros(head_dim)
            pattern[:16] = torch.randint(0, 2, (16,), generator=gen).float() * 2 - 1
            attn.qkv.weight[dim : 2 * dim] = 0
            attn.qkv.bias[dim : 2 * dim] = pattern.repeat(heads)
    return model


@pytest.mark.parametrize(
    "name,spec",
    [
        ("vit_tiny", (6, -1)),
        ("vit_tiny", 3),
        ("deit_distilled", (4, -1)),
        ("deit3_layerscale", [8, 4]),
        ("registers4", 3),
        ("cls_plus_1_register", (3, -1)),
        ("no_prefix_avg", (6, -1)),
        ("no_prefix_avg", 2),
        ("test_vit2_meanpool_reg", 3),
    ],
)
def test_tie_stress_identical_keys(name, spec):
    model = constant_keys_(model_copy(name), seed=3)
    x = pixels(name)
    r_layers = reference_schedule(spec, len(model.blocks))
    feats = reference_tome_features(model, x, r_layers)
    for formulation in ("scatter", "matmul"):
        tome, schedule = apply_tome(model, spec, formulation)
        assert sum(schedule.effective[1:]) > 0  # ties decide more than the first merge
        for fused in (True, False):
            set_fused(tome, fused)
            source, size = track_sources(tome, x)
            for b in range(BATCH):
                got_groups = [torch.nonzero(row).flatten().tolist() for row in source[b]]
                assert got_groups == feats["groups"][b], f"fused={fused} {formulation}: tie-break differs"
            with torch.no_grad():
                torch.testing.assert_close(features(tome, x), feats["tokens"].float(), rtol=0, atol=1e-4)
                torch.testing.assert_close(tome(x), reference_tome_forward(model, x, r_layers), rtol=0, atol=1e-4)


def test_batch_elements_are_independent():
    model = model_copy("registers4")
    tome, _ = apply_tome(model, (3, -1))
    x = torch.cat([pixels("registers4"), torch.zeros(1, 3, 64, 64)])
    with torch.no_grad():
        together = tome(x)
        alone = torch.cat([tome(x[i : i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (d) the original model is left alone
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_tiny", "deit_distilled", "test_vit2_meanpool_reg"])
def test_original_model_unchanged(name):
    model = model_copy(name)
    x = pixels(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    block_types = [type(block) for block in model.blocks]
    blocks_module = model.blocks
    tome, _ = apply_tome(model, FAMILIES[name][2][0])
    with torch.no_grad():
        tome(x)  # running the ToMe copy must not touch the original either
        after = model(x)
    assert model.blocks is blocks_module and isinstance(model.blocks, nn.Sequential)
    assert [type(block) for block in model.blocks] == block_types == [Block] * len(block_types)
    assert not any(hasattr(m, "tome_schedule") or hasattr(m, "tome_adapter") for m in (model, tome))
    new_state = model.state_dict()
    assert new_state.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(new_state[key], value), key
    assert torch.equal(before, after)
    # the copy does not share parameters with the original
    original_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not original_ptrs & {p.data_ptr() for p in tome.parameters()}


# ---------------------------------------------------------------------------------------------
# (e) unsupported models
# ---------------------------------------------------------------------------------------------
UNSUPPORTED = {
    "resnet18": lambda: timm.create_model("resnet18", num_classes=10),
    "linear": lambda: nn.Linear(4, 4),
    "swin": lambda: timm.create_model(
        "swin_tiny_patch4_window7_224",
        embed_dim=24,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
        img_size=64,
        window_size=4,
    ),
    "vit_relpos": lambda: timm.create_model("test_vit_relpos"),
    "vit_parallel_blocks": lambda: VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, block_fn=ParallelScalingBlock
    ),
    "vit_post_norm_blocks": lambda: VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, block_fn=ResPostBlock
    ),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_models_raise(name):
    model = UNSUPPORTED[name]()
    with pytest.raises(UnsupportedModelError):
        apply_tome(model, 4)
    with pytest.raises(UnsupportedModelError):
        apply_tome(model, 0)


def test_unknown_formulation_raises():
    with pytest.raises(ToMeError):
        apply_tome(model_copy("scale_norm"), 2, formulation="onehot")


# ---------------------------------------------------------------------------------------------
# (f) source tracking
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,spec",
    [("vit_tiny", (4, -1)), ("deit_distilled", 8), ("registers4", 2), ("no_prefix_avg", 18), ("test_vit", 3)],
)
def test_track_sources(name, spec):
    model = model_copy(name)
    tome, schedule = apply_tome(model, spec)
    source, size = track_sources(tome, pixels(name))
    n0, n_final = schedule.tokens[0], schedule.tokens[-1]
    assert source.shape == (BATCH, n_final, n0) and size.shape == (BATCH, n_final, 1)
    assert set(source.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(source.sum(dim=-1), size[..., 0], rtol=0, atol=0)  # row sum = size
    assert torch.equal(source.sum(dim=1), torch.ones(BATCH, n0))  # every input token in exactly one output
    p = int(model.num_prefix_tokens)
    # prefix tokens stay alone, first, in order
    assert torch.equal(source[:, :p, :p], torch.eye(p).expand(BATCH, p, p))
    assert torch.equal(size[:, :p, 0], torch.ones(BATCH, p))
    feats, _ = reference(name, repr(spec))
    for b in range(BATCH):
        got = [torch.nonzero(row).flatten().tolist() for row in source[b]]
        assert got == feats["groups"][b]
    torch.testing.assert_close(size[..., 0].double(), feats["size"], rtol=0, atol=0)


def test_track_sources_without_merging():
    tome, _ = apply_tome(model_copy("vit_tiny"), 0)
    source, size = track_sources(tome, pixels("vit_tiny"))
    n0 = source.shape[-1]
    assert torch.equal(source, torch.eye(n0).expand(BATCH, n0, n0))
    assert torch.equal(size, torch.ones(BATCH, n0, 1))


def test_schedule_attached_and_token_count():
    model = model_copy("registers4")
    tome, schedule = apply_tome(model, 8)
    assert tome_blocks(tome).schedule == schedule
    assert schedule.num_prefix == 5 and schedule.tokens[0] == 16 + 5
    _, tokens = reference_clamp(reference_schedule(8, 4), 21, 5)
    assert list(schedule.tokens) == tokens


def test_tome_blocks_record_the_adapter_shape_and_schedule():
    model = model_copy("registers4")
    tome, schedule = apply_tome(model, 8)
    record = tome_blocks(tome)
    assert record.adapter is timm_vit.ADAPTER
    assert record.shape == describe(timm_vit.ADAPTER, model) and record.schedule == schedule
    # plain attributes: no submodule, parameter or buffer, so the state_dict holds the model's weights only
    assert not any(m is record.adapter for m in tome.modules())
    assert not any(k.startswith(("blocks.adapter", "blocks.shape", "blocks.schedule")) for k in tome.state_dict())
    with torch.no_grad():
        want = tome(pixels("registers4"))
        clone = copy.deepcopy(tome)
        torch.testing.assert_close(clone(pixels("registers4")), want, rtol=0, atol=0)
    assert tome_blocks(clone).shape == record.shape and tome_blocks(clone).schedule == schedule
    assert tome_blocks(clone).adapter.family == record.adapter.family
    with pytest.raises(InvalidInputError, match="apply_tome"):
        tome_blocks(model)


# ---------------------------------------------------------------------------------------------
# Inputs of another size on dynamic_img_size models: the fixed schedule must refuse them
# ---------------------------------------------------------------------------------------------
def test_input_of_another_size_is_rejected_on_dynamic_img_size_model():
    model = base_model("test_vit")  # built for 96 px: 37 tokens, dynamic_img_size=True
    assert model.dynamic_img_size
    tome, schedule = apply_tome(model, 8)
    x = torch.randn(BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(1))  # 17 tokens
    with pytest.raises(ToMeError, match="37 tokens but the input has 17"):
        with torch.no_grad():
            tome(x)
    with pytest.raises(ToMeError, match="37 tokens"):
        track_sources(tome, x)
