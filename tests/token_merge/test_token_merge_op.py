"""tome::TokenMerge (`--merge plugin`): the PyTorch op, its ONNX export and its ONNX Runtime implementation,
against the plain references in reference_tome.py and against the scatter / matmul formulations."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_one_line_error
from onnx import TensorProto, helper
from reference_tome import reference_match, reference_merge, reference_token_merge

from tome_deploy.cli import export as export_cli
from tome_deploy.core.merge import bipartite_match, merge_weighted
from tome_deploy.errors import InvalidInputError, MissingDependencyError
from tome_deploy.jobs.export import export_model
from tome_deploy.models.patch import apply_tome
from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner
from tome_deploy.token_merge import contract
from tome_deploy.token_merge.torch_op import token_merge_reference
from tome_deploy.validation.parity import validate_onnx

FORMULATIONS = ["scatter", "matmul", "plugin"]
SHAPES = [(17, 1, 4), (18, 2, 8), (31, 5, 13), (24, 0, 12), (9, 0, 1)]  # (N, prefix, r), r = 1 to the maximum


def _merge_inputs(n: int, p: int, r: int, channels: int = 12, constant_metric: bool = False):
    gen = torch.Generator().manual_seed(100 * n + 10 * p + r)
    metric = torch.ones(2, n, 8) if constant_metric else torch.randn(2, n, 8, generator=gen)
    x = torch.randn(2, n, channels, generator=gen)
    size = torch.randint(1, 6, (2, n, 1), generator=gen).float()
    return metric, x, size, bipartite_match(metric, r, p)


@pytest.mark.parametrize("n,p,r", SHAPES)
def test_plugin_formulation_equals_independent_reference(n, p, r):
    metric, x, size, match = _merge_inputs(n, p, r)
    merged, merged_size = merge_weighted(x, size, match, "plugin")
    assert merged.shape == (2, n - r, 12) and merged_size.shape == (2, n - r, 1) and merged.dtype == x.dtype
    for b in range(2):
        src_a, dst_b, order = reference_match(metric[b], r, p)
        want_x, want_size = reference_merge(x[b], size[b, :, 0], src_a, dst_b, order)
        torch.testing.assert_close(merged[b].double(), want_x, rtol=1e-5, atol=1e-6)
        assert torch.equal(merged_size[b, :, 0].double(), want_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("constant_metric", [False, True], ids=["random", "all_to_one_destination"])
@pytest.mark.parametrize("n,p,r", SHAPES)
def test_three_formulations_agree(n, p, r, constant_metric, dtype):
    _, x, size, match = _merge_inputs(n, p, r, constant_metric=constant_metric)
    x = x.to(dtype)
    outputs = {f: merge_weighted(x, size, match, f) for f in FORMULATIONS}
    # Each sums in its own order: float32 rounding apart; float16 adds one rounding of the result.
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    for other in ("scatter", "matmul"):
        assert outputs["plugin"][0].dtype == dtype
        torch.testing.assert_close(outputs["plugin"][0].float(), outputs[other][0].float(), rtol=tol, atol=tol)
        assert torch.equal(outputs["plugin"][1], outputs[other][1])


def test_reference_op_follows_the_contract_on_arbitrary_positions():
    """Not only ToMe's matches: random kept order, sources anywhere, repeated destinations."""
    gen = torch.Generator().manual_seed(7)
    perm = torch.stack([torch.randperm(15, generator=gen) for _ in range(3)])  # [3, 15]
    source, kept = perm[:, :6], perm[:, 6:]
    destination = kept.gather(1, torch.randint(0, 3, (3, 6), generator=gen))  # only 3 distinct destinations
    x, size = torch.randn(3, 15, 4, generator=gen), torch.randint(1, 4, (3, 15, 1), generator=gen).float()
    indices = [t.int() for t in (kept, source, destination)]
    got_x, got_size = torch.ops.tome.token_merge(x, size, *indices)
    want_x, want_size = reference_token_merge(x, size, kept, source, destination)
    torch.testing.assert_close(got_x.double(), want_x, rtol=1e-6, atol=1e-6)
    assert torch.equal(got_size.double(), want_size)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda a: {**a, "kept": a["kept"].long()}, "kept must be int32"),
        (lambda a: {**a, "size": a["size"].half()}, "size must be float32"),
        (lambda a: {**a, "x": a["x"].double()}, "x must be float32 or float16"),
        (lambda a: {**a, "source": a["source"][:, :2]}, "source and destination must both be [B, r]"),
        (lambda a: {**a, "kept": a["kept"][:, 1:]}, "must be the N=9 input tokens"),
        (lambda a: {**a, "size": a["size"][:1]}, "size must be [2, 9, 1]"),
    ],
)
def test_contract_violations_are_typed_errors_naming_the_problem(change, fragment):
    _, x, size, match = _merge_inputs(9, 0, 3)
    args = {
        "x": x,
        "size": size,
        "kept": match.kept.int(),
        "source": match.source.int(),
        "destination": match.destination.int(),
    }
    with pytest.raises(InvalidInputError, match="contract") as caught:
        torch.ops.tome.token_merge(**change(args))
    assert fragment in str(caught.value)


# ---------------------------------------------------------------------------------------------
# ONNX export and ONNX Runtime
# ---------------------------------------------------------------------------------------------
def test_plugin_export_has_one_token_merge_node_per_merging_block(export_cached):
    exported = export_cached("vit_class_token", "plugin")
    model = onnx.load(str(exported.path))
    nodes = [n for n in model.graph.node if n.op_type == contract.OP_TYPE]
    assert len(nodes) == sum(r > 0 for r in exported.metadata.r_effective) == 6
    for node in nodes:
        assert node.domain == "tome"
        assert {a.name: helper.get_attribute_value(a) for a in node.attribute} == {
            "plugin_namespace": b"tome",
            "plugin_version": b"1",
        }
    assert not model.functions  # a local function would be inlined by TensorRT instead of taking the plugin
    assert ("tome", 1) in {(o.domain, o.version) for o in model.opset_import}
    assert not {n.op_type for n in model.graph.node} & {"ScatterElements", "ScatterND"}
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    for node in nodes:
        assert [types[name] for name in node.input] == [TensorProto.FLOAT, TensorProto.FLOAT] + [TensorProto.INT32] * 3


def test_plugin_export_matches_pytorch_in_onnx_runtime(export_cached):
    exported = export_cached("vit_class_token", "plugin")
    report = validate_onnx(exported.tome, exported.path, exported.metadata, batch_sizes=[1, 2, 3])
    assert report.passed, report.table()
    assert max(v.max_abs for v in report.verdicts) < 1e-4


def test_plugin_export_with_register_tokens_matches_pytorch(export_cached):
    """Five prefix tokens (class + 4 registers), mean pooling, LayerScale, decreasing schedule."""
    exported = export_cached("registers_meanpool_layerscale", "plugin")
    report = validate_onnx(exported.tome, exported.path, exported.metadata, batch_sizes=[2])
    assert report.passed, report.table()


def test_three_formulation_exports_agree_in_onnx_runtime(export_cached):
    exports = {f: export_cached("vit_class_token", f) for f in FORMULATIONS}
    pixels = np.random.default_rng(5).standard_normal((3, *exports["plugin"].metadata.input.shape)).astype(np.float32)
    logits = {}
    for formulation, exported in exports.items():
        with OnnxRuntimeRunner(exported.path) as runner:
            logits[formulation] = runner.infer({"pixel_values": pixels})["logits"]
    np.testing.assert_allclose(logits["plugin"], logits["scatter"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits["plugin"], logits["matmul"], rtol=1e-5, atol=1e-5)


def _single_node_model(x_type: int, batch: int, tokens: int, channels: int, merged: int) -> onnx.ModelProto:
    node = helper.make_node(
        contract.OP_TYPE,
        list(contract.INPUTS),
        list(contract.OUTPUTS),
        domain=contract.OP_DOMAIN,
        **contract.NODE_ATTRIBUTES,
    )
    index = [
        helper.make_tensor_value_info(name, TensorProto.INT32, [batch, n])
        for name, n in (("kept", merged), ("source", tokens - merged), ("destination", tokens - merged))
    ]
    graph = helper.make_graph(
        [node],
        "token_merge",
        [
            helper.make_tensor_value_info("x", x_type, [batch, tokens, channels]),
            helper.make_tensor_value_info("size", TensorProto.FLOAT, [batch, tokens, 1]),
            *index,
        ],
        [
            helper.make_tensor_value_info("merged_x", x_type, [batch, merged, channels]),
            helper.make_tensor_value_info("merged_size", TensorProto.FLOAT, [batch, merged, 1]),
        ],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(contract.OP_DOMAIN, 1)]
    )


@pytest.mark.parametrize("dtype, onnx_type", [(np.float32, TensorProto.FLOAT), (np.float16, TensorProto.FLOAT16)])
def test_onnx_runtime_op_follows_the_contract_in_float32_and_float16(tmp_path, dtype, onnx_type):
    n, r = 23, 9
    _, x, size, match = _merge_inputs(n, 1, r, channels=10, constant_metric=False)
    path = tmp_path / "token_merge.onnx"
    onnx.save(_single_node_model(onnx_type, 2, n, 10, n - r), str(path))
    before = path.read_bytes()
    feed = {
        "x": x.numpy().astype(dtype),
        "size": size.numpy(),
        **{
            name: t.int().numpy()
            for name, t in zip(("kept", "source", "destination"), (match.kept, match.source, match.destination))
        },
    }
    with OnnxRuntimeRunner(path) as runner:
        got = runner.infer(feed)
    assert path.read_bytes() == before  # the runner rewrites an in-memory copy, never the file
    assert got["merged_x"].dtype == dtype and got["merged_size"].dtype == np.float32
    want_x, want_size = token_merge_reference(*(torch.from_numpy(feed[k]) for k in contract.INPUTS))
    np.testing.assert_array_equal(got["merged_x"], want_x.numpy())  # the contract fixes every rounding
    np.testing.assert_array_equal(got["merged_size"], want_size.numpy())
    plain_x, _ = reference_token_merge(torch.from_numpy(feed["x"]), size, match.kept, match.source, match.destination)
    tol = 1e-6 if dtype == np.float32 else 1e-3
    np.testing.assert_allclose(got["merged_x"].astype(np.float64), plain_x.numpy(), rtol=tol, atol=tol)


@pytest.mark.slow
def test_vit_small_r16_plugin_export_passes_validation_and_formulations_agree(tmp_path_factory):
    """The acceptance case: vit_small_patch16_224 (random weights), r=16, dynamic batch, default tolerance."""
    path = tmp_path_factory.mktemp("vit_s") / "vit_s_plugin.onnx"
    outcome = export_model("vit_small_patch16_224", path, r=16, merge="plugin", validate=False)
    metadata = outcome.export.metadata
    nodes = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == contract.OP_TYPE]
    assert len(nodes) == sum(r > 0 for r in metadata.r_effective) == 12
    assert outcome.schedule.clamped_layers == [11]  # 197 tokens hold r=16 for 11 of the 12 blocks
    tomes = {f: apply_tome(outcome.loaded.model, 16, f)[0] for f in FORMULATIONS}
    report = validate_onnx(tomes["plugin"], path, metadata, batch_sizes=[2])
    assert report.passed, report.table()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = {f: tome(pixels) for f, tome in tomes.items()}
    for other in ("scatter", "matmul"):
        torch.testing.assert_close(logits["plugin"], logits[other], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Without onnxruntime-extensions
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def without_ort_extensions(monkeypatch):
    """`import onnxruntime_extensions` raises ImportError, as on a machine without the plugin extra."""
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)


def test_plugin_export_without_extensions_fails_before_exporting(without_ort_extensions, capsys, tmp_path):
    code = export_cli.main(["test_vit", "--r", "8", "--merge", "plugin", "-o", str(tmp_path / "m.onnx")])
    assert code == MissingDependencyError.exit_code == 4
    assert_one_line_error(capsys.readouterr().err, "onnxruntime-extensions", "pip install 'tome-deploy[plugin]'")
    assert not (tmp_path / "m.onnx").exists()


def test_plugin_graph_without_extensions_is_a_typed_error(export_cached, without_ort_extensions):
    exported = export_cached("vit_class_token", "plugin")
    with pytest.raises(MissingDependencyError, match=r"onnxruntime-extensions.*pip install"):
        OnnxRuntimeRunner(exported.path).activate()  # the session loads, and the op is registered, on activation


def test_scatter_graphs_validate_without_extensions(export_cached, without_ort_extensions):
    exported = export_cached("vit_class_token", "scatter")
    report = validate_onnx(exported.tome, exported.path, exported.metadata, batch_sizes=[2])
    assert report.passed, report.table()


@pytest.mark.slow
def test_matmul_exports_and_validates_through_the_cli_without_extensions(without_ort_extensions, capsys, tmp_path):
    code = export_cli.main(["test_vit", "--r", "8", "--merge", "matmul", "-o", str(tmp_path / "m.onnx")])
    assert code == 0, capsys.readouterr().err  # 0: exported and the ONNX Runtime parity check passed
    assert (tmp_path / "m.onnx").exists()
