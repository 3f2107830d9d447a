"""Merge formulations are registered objects (tome_deploy/artifact/formulations.py): a toy formulation added
through docs/architecture.md's "Where to add things" steps works end to end, and no module branches on a name."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model

from tome_deploy.artifact.formulations import (
    MergeFormulation,
    formulation_named,
    formulation_names,
    merge_for_target,
    register,
    unregister,
)
from tome_deploy.cli.export import build_parser
from tome_deploy.errors import InvalidInputError
from tome_deploy.jobs.export import export_model
from tome_deploy.models.loading.source import ModelSource
from tome_deploy.models.patch import apply_tome
from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "tome_deploy"
BUILT_IN_NAMES = ("scatter", "matmul", "plugin")


# ---------------------------------------------------------------------------------------------
# No module compares a formulation's name
# ---------------------------------------------------------------------------------------------
def _is_name_literal(node: ast.AST) -> bool:
    """A built-in formulation's name as a string literal, or a tuple / list / set literal holding one."""
    if isinstance(node, ast.Constant):
        return node.value in BUILT_IN_NAMES
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(_is_name_literal(item) for item in node.elts)


def name_branches(source: str) -> list[int]:
    """Lines of `source` that branch on a formulation's name: a comparison (==, !=, in, is) with a name
    literal, a `case "plugin":`, or a dict keyed by names (a dispatch table)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(_is_name_literal(n) for n in [node.left, *node.comparators]):
            lines.append(node.lineno)
        elif isinstance(node, ast.MatchValue) and _is_name_literal(node.value):
            lines.append(node.lineno)
        elif isinstance(node, ast.Dict) and any(key is not None and _is_name_literal(key) for key in node.keys):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_module_branches_on_a_formulation_name():
    """Callers ask the formulation object (supports_target, needs_custom_op, row_adder, ...); the registry
    itself only looks names up, so no module is exempt."""
    offenders = [
        f"{path.relative_to(PACKAGE_ROOT.parent)}:{line}"
        for path in sorted(PACKAGE_ROOT.rglob("*.py"))
        for line in name_branches(path.read_text())
    ]
    assert not offenders, (
        "modules that branch on a merge formulation's name (ask the MergeFormulation instead):\n" + "\n".join(offenders)
    )


@pytest.mark.parametrize(
    "source",
    [
        'def f(merge, runs):\n    if merge == "plugin" and runs:\n        pass\n',
        'ok = formulation.name != "scatter"\n',
        'if merge in ("scatter", "matmul"):\n    pass\n',
        'match merge:\n    case "matmul":\n        pass\n',
        'ADDERS = {"scatter": 1, "matmul": 2}\n',
    ],
)
def test_the_name_scan_sees_a_branch(source):
    assert name_branches(source), source


def test_the_name_scan_leaves_other_strings_alone():
    assert not name_branches(
        'if runtime == "openvino":\n    pass\napply_tome(model, 4, "scatter")\nDEFAULT = {"tensorrt": "matmul"}\n'
    )


# ---------------------------------------------------------------------------------------------
# A toy formulation, added exactly as docs/architecture.md says
# ---------------------------------------------------------------------------------------------
def einsum_rows(destination: torch.Tensor, num_rows: int):
    """destination: [B, r, 1] -> add(x [B, num_rows, C], src [B, r, C]): the one-hot sum as one einsum."""
    hits = destination == torch.arange(num_rows, device=destination.device)  # [B, r, M]

    def add(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        return x + torch.einsum("brm,brc->bmc", hits.to(src.dtype), src)  # [B, M, C]

    return add


EINSUM = MergeFormulation(
    name="einsum",
    description="a one-hot einsum (a test's toy)",
    targets=("onnxruntime",),
    runtimes=("onnxruntime",),
    refusals={"tensorrt": "the toy is only tried in ONNX Runtime", "openvino": "the toy is only tried in ONNX Runtime"},
    row_adder=einsum_rows,
)


@pytest.fixture
def einsum():
    register(EINSUM)
    try:
        yield EINSUM
    finally:
        unregister(EINSUM.name)
    assert formulation_names() == BUILT_IN_NAMES  # other tests see the built-in formulations only


def test_a_registered_formulation_is_known_everywhere(einsum):
    assert formulation_names() == (*BUILT_IN_NAMES, "einsum") and formulation_named("einsum") is einsum
    parser = build_parser()
    assert parser.parse_args(["test_vit", "-o", "x.onnx", "--merge", "einsum"]).merge == "einsum"
    assert "einsum (a one-hot einsum (a test's toy))" in " ".join(parser.format_help().split())
    assert merge_for_target("einsum", "onnxruntime") is einsum
    with pytest.raises(
        InvalidInputError, match="--merge einsum cannot run on tensorrt: the toy is only tried in ONNX Runtime"
    ):
        merge_for_target("einsum", "tensorrt")
    with pytest.raises(InvalidInputError, match="already registered"):
        register(einsum)


def test_unregistered_formulation_is_unknown():
    with pytest.raises(
        InvalidInputError, match="unknown merge formulation 'einsum'; choose one of scatter, matmul, plugin"
    ):
        formulation_named("einsum")


def test_toy_formulation_matches_scatter_eagerly(einsum):
    model = make_model("test_vit", {})
    pixels = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    toy, _ = apply_tome(model, 8, "einsum")
    scatter, _ = apply_tome(model, 8, "scatter")
    assert "formulation=einsum" in repr(toy)
    with torch.no_grad():
        torch.testing.assert_close(toy(pixels), scatter(pixels), rtol=1e-5, atol=1e-5)
    assert not torch.equal(toy(pixels), model(pixels))  # tokens were merged


def test_toy_formulation_exports_and_matches_scatter_in_onnx_runtime(einsum, tmp_path):
    outcome = export_model(ModelSource("test_vit", seed=0), tmp_path / "einsum.onnx", r=8, merge="einsum", batch_size=2)
    assert outcome.written and outcome.validation.passed  # ONNX Runtime against the toy in PyTorch
    assert outcome.export.metadata.merge == "einsum"
    pixels = np.random.default_rng(0).standard_normal((2, 3, 160, 160)).astype(np.float32)
    with OnnxRuntimeRunner(outcome.export.path) as runner:
        got = runner.infer({outcome.export.metadata.input.name: pixels})
    scatter, _ = apply_tome(outcome.loaded.model, 8, "scatter")
    with torch.no_grad():
        expected = scatter(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(got[outcome.export.metadata.output_name], expected, rtol=1e-4, atol=1e-4)
