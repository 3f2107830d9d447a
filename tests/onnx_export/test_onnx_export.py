"""ONNX export: static shapes, metadata, op choice per formulation, and parity with PyTorch in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import export_family

from tome_deploy.artifact.onnx_file import read_metadata
from tome_deploy.errors import InvalidInputError
from tome_deploy.models.patch import tome_blocks, track_sources
from tome_deploy.validation.parity import validate_onnx
from tome_deploy.validation.probes import constant_images


def _dims(value) -> list:
    return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in value.type.tensor_type.shape.dim]


def test_ort_matches_pytorch_at_several_batch_sizes(exported_family):
    """Traced at batch 2; checked at 1, 2 and 3 on random, constant and natural images."""
    report = validate_onnx(exported_family.tome, exported_family.path, exported_family.metadata, batch_sizes=[1, 2, 3])
    assert report.passed, report.table()
    assert {v.probe for v in report.verdicts} == {"random", "constant", "natural"}
    assert max(v.max_abs for v in report.verdicts) < 1e-4


def test_only_the_batch_dimension_is_symbolic(exported_family):
    model = onnx.load(str(exported_family.path))
    values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    assert len(model.graph.value_info) > 100  # every intermediate value carries its shape
    symbolic = {d for v in values for d in _dims(v) if isinstance(d, str)}
    assert symbolic == {"batch"}
    assert _dims(model.graph.input[0]) == ["batch", *exported_family.metadata.input.shape]


def test_metadata_round_trips_and_describes_the_schedule(exported_family):
    meta = read_metadata(exported_family.path)
    assert meta == exported_family.metadata
    schedule = tome_blocks(exported_family.tome).schedule
    assert meta.r_effective == list(schedule.effective)
    assert meta.tokens_per_layer == list(schedule.tokens)
    tokens = exported_family.tome.patch_embed.num_patches + exported_family.model.num_prefix_tokens
    assert meta.tokens_per_layer[0] == tokens
    assert meta.tokens_per_layer[-1] == tokens - sum(meta.r_effective)
    assert meta.input.preprocessing["mean"] == list(exported_family.model.pretrained_cfg["mean"])


def test_output_token_count_matches_schedule_in_ort(exported_family):
    """Compare final tokens directly: export the features (before pooling) of the same ToMe model."""
    tome = exported_family.tome
    meta = exported_family.metadata
    pixels = torch.randn(2, *meta.input.shape)
    with torch.no_grad():
        features = tome.forward_features(pixels)
    assert features.shape[1] == meta.tokens_per_layer[-1]


@pytest.mark.parametrize(
    "merge, forbidden",
    [("scatter", {"ScatterElements", "Scatter"}), ("matmul", {"ScatterElements", "ScatterND", "Scatter"})],
)
def test_formulation_decides_the_merge_ops(export_cached, merge, forbidden):
    """scatter sums whole rows with ScatterND(add) (ScatterElements indexes every element, ~6x slower in ONNX
    Runtime); matmul has no scatter op at all."""
    exported = export_cached("vit_class_token", merge)
    ops = {node.op_type for node in onnx.load(str(exported.path)).graph.node}
    assert not ops & forbidden
    if merge == "scatter":
        scatters = [n for n in onnx.load(str(exported.path)).graph.node if n.op_type == "ScatterND"]
        assert scatters and all(
            onnx.helper.get_attribute_value(a) == b"add" for n in scatters for a in n.attribute if a.name == "reduction"
        )


def test_scatter_and_matmul_exports_agree(export_cached):
    scatter, matmul = export_cached("vit_class_token", "scatter"), export_cached("vit_class_token", "matmul")
    pixels = np.random.default_rng(3).standard_normal((3, *scatter.metadata.input.shape)).astype(np.float32)
    outputs = [
        ort.InferenceSession(str(e.path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": pixels})[0]
        for e in (scatter, matmul)
    ]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


def test_static_batch_export_has_no_symbolic_dimension(export_cached):
    exported = export_cached("vit_class_token", batch=2)
    model = onnx.load(str(exported.path))
    assert _dims(model.graph.input[0]) == [2, *exported.metadata.input.shape]
    assert not {d for v in model.graph.value_info for d in _dims(v) if isinstance(d, str)}
    report = validate_onnx(exported.tome, exported.path, exported.metadata)
    assert report.passed and {v.batch for v in report.verdicts} == {2}


class _SourceTracker(torch.nn.Module):
    def __init__(self, tome):
        super().__init__()
        self.tome = tome

    def forward(self, pixels):
        return track_sources(self.tome, pixels)[0]


@pytest.mark.parametrize("merge", ["scatter", "matmul"])
def test_constant_image_merges_the_same_tokens_in_ort(tmp_path, export_cached, merge):
    """Every patch identical: all similarities tie, so only the tie rules decide; ORT must pick as PyTorch."""
    exported = export_cached("vit_class_token", merge)
    meta = exported.metadata
    pixels = constant_images(2, meta.input.shape, meta.input.preprocessing["mean"], meta.input.preprocessing["std"])
    path = tmp_path / "sources.onnx"
    torch.onnx.export(
        _SourceTracker(exported.tome).eval(), (torch.from_numpy(pixels),), str(path), dynamo=True, opset_version=18
    )
    in_ort = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixels": pixels})[0]
    with torch.no_grad():
        in_torch = track_sources(exported.tome, torch.from_numpy(pixels))[0].numpy()
    assert in_torch.shape == (2, meta.tokens_per_layer[-1], meta.tokens_per_layer[0])
    np.testing.assert_array_equal(in_ort, in_torch)
    # and the ties really were exercised: the sources are not those of a random image
    with torch.no_grad():
        random_sources = track_sources(exported.tome, torch.randn(2, *meta.input.shape))[0].numpy()
    assert not np.array_equal(random_sources, in_torch)


def test_export_refuses_missing_output_directory(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        export_family("vit_class_token", tmp_path / "missing")


def test_read_metadata_of_foreign_onnx_is_none(tmp_path):
    node = onnx.helper.make_node("Identity", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    assert read_metadata(path) is None


@pytest.fixture(scope="module")
def two_block_vit(tmp_path_factory):
    """test_vit cut to 2 blocks at 64 px (17 tokens with the class token), saved as a module file."""
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("two_block") / "vit.pt"
    torch.save(timm.create_model("test_vit", depth=2, img_size=64).eval(), path)
    return path


def _merger_ops(path) -> list[str]:
    from tome_deploy.runtime.profiling import merger_node_names

    merger = merger_node_names(path)
    return [node.op_type for node in onnx.load(str(path)).graph.node if node.name in merger]


@pytest.mark.parametrize("merge", ["scatter", "matmul"])
def test_score_order_is_one_topk_for_onnx_runtime_and_a_counting_rank_for_tensorrt(tmp_path, two_block_vit, merge):
    """ONNX Runtime and OpenVINO follow the ONNX spec on TopK ties (lower index first), so their exports
    order the scores with TopK alone (one over the scores, one putting the unmerged back in index order).
    TensorRT documents no tie order: its exports count ranks (Greater / Equal / Or over [B, Na, Na]) and
    sort distinct keys. Both pass parity with PyTorch on constant images, where every score ties."""
    from tome_deploy.jobs.export import export_model

    counts = {}
    for target in ["onnxruntime", "tensorrt"] if merge == "matmul" else ["onnxruntime"]:
        out = tmp_path / f"{target}.onnx"
        outcome = export_model(str(two_block_vit), out, r=4, merge=merge, target=target)
        assert outcome.validation.passed, outcome.validation.table()
        assert "constant" in {v.probe for v in outcome.validation.verdicts}
        ops = _merger_ops(out)
        counts[target] = {op: ops.count(op) for op in ("TopK", "Greater", "Equal", "Or")}
    # Equal: one per block builds the scatter's image index or the one-hot merge matrix.
    assert counts["onnxruntime"] == {"TopK": 4, "Greater": 0, "Equal": 2, "Or": 0}
    if merge == "matmul":  # per block, one Equal for the counting rank and one for the one-hot merge matrix
        assert counts["tensorrt"] == {"TopK": 2, "Greater": 2, "Equal": 4, "Or": 2}


def test_onnxruntime_profile_counts_the_keys_mean_with_matching(export_cached):
    """ONNX Runtime's merge share counts the TokenMerger nodes, the keys' mean over heads (the metric) included,
    and none of attention's or the MLP's MatMuls. Which nodes count, not how long they take: times are not
    asserted."""
    from tome_deploy.runtime.profiling import merger_node_names, profile_side_by_side

    exported = export_cached("vit_class_token", "scatter")
    pixels = np.random.default_rng(0).standard_normal((2, *exported.metadata.input.shape)).astype(np.float32)
    tome = profile_side_by_side("onnxruntime", {"tome": exported.path}, "pixel_values", pixels, runs=1)["tome"]
    merger_nodes = merger_node_names(exported.path)
    # A profiled node counts as merge exactly when it is a node of a TokenMerger scope.
    assert {layer.name for layer in tome.layers if layer.merge} == {layer.name for layer in tome.layers} & merger_nodes
    merge_types = tome.op_types(merge_only=True)
    assert {"ReduceMean", "TopK", "ScatterND", "GatherND"} <= set(merge_types)
    # The keys' mean over heads: one ReduceMean per merging block, each counted with matching.
    merging_blocks = sum(r > 0 for r in exported.metadata.r_effective)
    assert merging_blocks > 0 and merge_types["ReduceMean"][0] == tome.op_types()["ReduceMean"][0] == merging_blocks
    # Of the MatMuls, only the scores' (one per merging block, if ONNX Runtime has not fused it away) count;
    # attention's and the MLP's never do, nor their softmax, norms and GELU.
    score_matmuls = sum(merge_types.get(op, (0, 0.0))[0] for op in ("MatMul", "FusedMatMul"))
    assert score_matmuls <= merging_blocks < tome.op_types()["MatMul"][0]
    assert not {"Gemm", "Softmax", "LayerNormalization", "SkipLayerNormalization", "Erf"} & set(merge_types)
