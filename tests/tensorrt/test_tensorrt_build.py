"""TensorRT engines: real TensorRT-RTX parser and builder on CPU (ahead of time for SM89), sidecars, refusals.

Engine execution needs a CUDA GPU and a TensorRT runtime; those tests skip with a one-line reason here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_one_line_error

from tome_deploy.artifact.onnx_file import read_metadata
from tome_deploy.artifact.sidecar import (
    BatchProfile,
    EngineMismatchError,
    check_runs_here,
    file_sha256,
    read_sidecar,
    sidecar_path,
)
from tome_deploy.cli import build as build_cli
from tome_deploy.cli import export as export_cli
from tome_deploy.cli import validate as validate_cli
from tome_deploy.onnx_export.export import check_onnx_output, write_onnx
from tome_deploy.runtime.tensorrt import TensorRTRunner
from tome_deploy.runtime.tensorrt_backend import local_compute_capability

pytestmark = pytest.mark.tensorrt

trt_rtx = pytest.importorskip(
    "tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install 'tome-deploy[tensorrt-rtx]')"
)
CC = "89"


def run_cli(capsys, cli, *args: str) -> tuple[int, str, str]:
    """capsys None (module fixtures): the output is left to pytest's own capture."""
    code = cli.main(list(args))
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def export(capsys, folder: Path, name: str, *args: str) -> Path:
    path = folder / f"{name}.onnx"
    code, _, err = run_cli(capsys, export_cli, *args, "-o", str(path), "--no-validate", "--quiet")
    assert code == 0, err
    return path


def build(capsys, onnx_path: Path, *args: str) -> Path:
    plan = onnx_path.with_suffix(".plan")
    code, _, err = run_cli(
        capsys,
        build_cli,
        str(onnx_path),
        "-o",
        str(plan),
        "--backend",
        "tensorrt-rtx",
        "--compute-capability",
        CC,
        *args,
    )
    assert code == 0, err
    return plan


def write_foreign_onnx(path: Path) -> Path:
    """A valid ONNX image model that tome-export did not write (no ToMe metadata)."""
    from onnx import TensorProto, helper

    pixels = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["N", 3, 8, 8])
    pooled = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 3, 1, 1])
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["images"], ["pooled"])], "pool", [pixels], [pooled]
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.fixture(scope="module")
def vit_engine(tmp_path_factory):
    """test_vit r=8 for TensorRT, built for SM89 with a batch profile 1..8: the engine the sidecar, inspect
    and refusal tests share. (It was ViT-S/16 r=16; the parser and builder take the same ops from a
    6-block, 64-wide ViT in a fraction of the time. Engine parity at ViT-S size is the GPU test below.)"""
    folder = tmp_path_factory.mktemp("trt")
    onnx_path = export(None, folder, "test_vit_r8", "test_vit", "--r", "8", "--target", "tensorrt")
    return onnx_path, build(None, onnx_path, "--max-batch", "8")


def assert_sidecar_matches_onnx(plan: Path, onnx_path: Path) -> dict:
    sidecar = read_sidecar(plan)
    metadata = read_metadata(onnx_path)
    assert sidecar.tome == metadata  # schedule, tokens per layer, merge, precision, weights...
    assert sidecar.precision == metadata.precision
    assert (sidecar.backend, sidecar.backend_version) == ("tensorrt-rtx", trt_rtx.__version__)
    assert sidecar.compute_capabilities == [CC]
    assert sidecar.onnx_sha256 == file_sha256(onnx_path) and Path(sidecar.onnx_path) == onnx_path.resolve()
    assert sidecar.plan_bytes == plan.stat().st_size > 1_000_000
    assert sidecar.input_shape == list(metadata.input.shape) and sidecar.input_name == metadata.input.name
    return sidecar.tome.to_dict()


@pytest.mark.slow
def test_test_vit_r8_builds_with_a_sidecar_from_the_onnx_metadata(vit_engine, capsys):
    onnx_path, plan = vit_engine
    tome = assert_sidecar_matches_onnx(plan, onnx_path)
    assert tome["merge"] == "matmul" and tome["target"] == "tensorrt"  # --target tensorrt picked the one-hot merge
    assert tome["tokens_per_layer"] == [101, 93, 85, 77, 69, 61, 53]  # 10x10 patches + class, 8 fewer per block
    assert read_sidecar(plan).profiles == [BatchProfile("pixel_values", 1, 8, 8)]
    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert not ops & {"ScatterElements", "ScatterND"}

    code, _, err = run_cli(capsys, build_cli, "--inspect", str(plan))
    assert code == 0
    assert "tensorrt-rtx" in err and "compute capability 89" in err and "batch min 1, opt 8, max 8" in err
    assert "[101, 93, 85" in err and "merge=matmul" in err
    assert read_sidecar(plan).output_shape == [1000] and "logits [batch, 1000]" in err
    if local_compute_capability() is None:
        assert "runs here    no: the engine needs a CUDA GPU" in err


@pytest.fixture(scope="module")
def fp16_export(tmp_path_factory) -> tuple[Path, dict]:
    """test_vit r=8 exported in fp16 for TensorRT, validated in ONNX Runtime: (ONNX file, JSON report)."""
    onnx_path = tmp_path_factory.mktemp("fp16") / "fp16.onnx"
    report = onnx_path.with_suffix(".json")
    code = export_cli.main(
        [
            "test_vit",
            "--r",
            "8",
            "--target",
            "tensorrt",
            "--precision",
            "fp16",
            "-o",
            str(onnx_path),
            "--report",
            str(report),
            "--quiet",
        ]
    )
    assert code == 0
    return onnx_path, json.loads(report.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["inflected", "fp16", "registers", "distilled", "external_data"])
def test_variants_build(variant, tmp_path, capsys, export_cached, fp16_export):
    if variant == "external_data":  # the layout of an export over 2 GiB: the parser reads the weights beside it
        single = export_cached("registers_meanpool_layerscale", merge="matmul").path
        onnx_path = write_onnx(onnx.load(str(single)), check_onnx_output(tmp_path / "pair.onnx"), external_data=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pair.onnx", "pair.onnx.data"]
    elif variant == "inflected":
        onnx_path = export(
            capsys, tmp_path, variant, "test_vit", "--r", "16", "--r-inflect", "-1", "--target", "tensorrt"
        )
    elif variant == "fp16":
        onnx_path = fp16_export[0]
    else:
        family = {"registers": "registers_meanpool_layerscale", "distilled": "deit_distilled"}[variant]
        onnx_path = export_cached(family, merge="matmul").path
    plan = build(capsys, onnx_path, "--max-batch", "4")
    tome = assert_sidecar_matches_onnx(plan, onnx_path)
    if variant == "inflected":
        assert tome["r_effective"][0] > tome["r_effective"][-1] and tome["schedule"] == [16, -1.0]
    if variant == "fp16":
        assert tome["precision"] == "fp16"
    if variant == "registers":
        assert tome["num_prefix_tokens"] >= 1 and tome["model"] == "test_vit2"
    if variant == "distilled":
        assert tome["num_prefix_tokens"] == 2


def test_a_graph_without_its_external_data_file_is_refused_before_parsing(export_cached, tmp_path, capsys):
    single = export_cached("registers_meanpool_layerscale", merge="matmul").path
    graph = write_onnx(onnx.load(str(single)), check_onnx_output(tmp_path / "pair.onnx"), external_data=True)
    graph.with_name("pair.onnx.data").unlink()
    plan = tmp_path / "pair.plan"
    code, _, err = run_cli(
        capsys, build_cli, str(graph), "-o", str(plan), "--backend", "tensorrt-rtx", "--compute-capability", CC
    )
    assert code == 2
    assert_one_line_error(err, "pair.onnx.data, which is missing", "put pair.onnx.data back beside pair.onnx")
    assert not plan.exists() and not sidecar_path(plan).exists()


def test_scatter_export_is_refused_with_the_fix(export_cached, tmp_path, capsys):
    onnx_path = export_cached("vit_class_token", merge="scatter").path
    plan = tmp_path / "refused.plan"
    code, _, err = run_cli(
        capsys, build_cli, str(onnx_path), "-o", str(plan), "--backend", "tensorrt-rtx", "--compute-capability", CC
    )
    assert code == 2
    assert_one_line_error(
        err, "ScatterND(reduction=add)", "whose sum tensorrt-rtx does not support", "--target tensorrt"
    )
    assert not plan.exists() and not sidecar_path(plan).exists()


def test_export_refuses_scatter_for_tensorrt(tmp_path, capsys):
    code, _, err = run_cli(
        capsys, export_cli, "test_vit", "--target", "tensorrt", "--merge", "scatter", "-o", str(tmp_path / "x.onnx")
    )
    assert code == 2
    assert_one_line_error(err, "--merge scatter cannot run on tensorrt", "--merge matmul")


def test_foreign_onnx_builds_with_a_note(tmp_path, capsys):
    """Not a tome-deploy export: still builds, the sidecar has no schedule and says so."""
    onnx_path = write_foreign_onnx(tmp_path / "foreign.onnx")
    plan = tmp_path / "foreign.plan"
    code, _, err = run_cli(
        capsys, build_cli, str(onnx_path), "-o", str(plan), "--backend", "tensorrt-rtx", "--compute-capability", CC
    )
    assert code == 0, err
    assert "no ToMe schedule is known" in err
    sidecar = read_sidecar(plan)
    assert sidecar.tome is None and sidecar.input_name == "images" and sidecar.output_name == "pooled"
    assert sidecar.input_shape == [3, 8, 8] and sidecar.output_shape == [3, 1, 1]
    code, _, err = run_cli(capsys, build_cli, "--inspect", str(plan))
    assert code == 0 and "no ToMe schedule known" in err


def test_truncated_or_corrupt_engine_is_refused(vit_engine, tmp_path, capsys):
    _, plan = vit_engine
    broken = tmp_path / "broken.plan"
    broken.write_bytes(plan.read_bytes()[: plan.stat().st_size // 2])
    shutil.copy(sidecar_path(plan), sidecar_path(broken))
    code, _, err = run_cli(capsys, build_cli, "--inspect", str(broken))
    assert code == 2
    assert_one_line_error(err, "corrupt or truncated", "rebuild it with tome-build")
    with pytest.raises(EngineMismatchError, match="corrupt or truncated"):
        TensorRTRunner(broken)
    flipped = bytearray(plan.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF
    broken.write_bytes(bytes(flipped))
    with pytest.raises(EngineMismatchError, match="corrupt or truncated"):
        read_sidecar(broken)
    sidecar_path(broken).unlink()
    with pytest.raises(EngineMismatchError, match="has no sidecar"):
        read_sidecar(broken)


def test_engine_from_another_tensorrt_or_for_another_gpu_is_refused(vit_engine, tmp_path):
    _, plan = vit_engine
    copied = tmp_path / "other.plan"
    shutil.copy(plan, copied)
    record = json.loads(sidecar_path(plan).read_text())
    record["backend_version"] = "1.0.0.1"
    sidecar_path(copied).write_text(json.dumps(record))
    with pytest.raises(EngineMismatchError, match=r"built by tensorrt-rtx 1\.0\.0\.1 but tensorrt-rtx .* is installed"):
        TensorRTRunner(copied)
    sidecar = read_sidecar(plan)
    with pytest.raises(
        EngineMismatchError, match="built for compute capability 89 but this GPU is 80.*--compute-capability 80"
    ):
        check_runs_here(sidecar, "tensorrt-rtx", trt_rtx.__version__, "80")
    with pytest.raises(EngineMismatchError, match="needs a CUDA GPU"):
        check_runs_here(sidecar, "tensorrt-rtx", trt_rtx.__version__, None)
    check_runs_here(sidecar, "tensorrt-rtx", trt_rtx.__version__, "89")  # the matching GPU passes


@pytest.mark.skipif(local_compute_capability() is not None, reason="checks the message on a machine without a GPU")
def test_validating_an_engine_without_a_gpu_says_so(vit_engine, capsys):
    _, plan = vit_engine
    code, _, err = run_cli(capsys, validate_cli, "test_vit", str(plan))
    assert code == 2
    assert_one_line_error(
        err, "needs a CUDA GPU (compute capability 89)", "validate the ONNX file with ONNX Runtime instead"
    )


def test_batch_outside_the_profile_is_refused(vit_engine):
    profile = read_sidecar(vit_engine[1]).profiles[0]
    profile.check(1), profile.check(8)
    with pytest.raises(ValueError, match=r"batch 9 is outside the engine's optimization profile \(1\.\.8"):
        profile.check(9)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--min-batch", "8", "--max-batch", "4"], ["--min-batch <= --opt-batch <= --max-batch"]),
        (["--compute-capability", "90"], ["not offered by tensorrt-rtx", "89"]),
        (["-o", "/nonexistent/dir/model.plan"], ["output directory /nonexistent/dir does not exist"]),
    ],
)
def test_bad_build_arguments(vit_engine, args, fragments, tmp_path, capsys):
    onnx_path, _ = vit_engine
    base = [str(onnx_path), "--backend", "tensorrt-rtx"]
    if "-o" not in args:
        base += ["-o", str(tmp_path / "x.plan")]
    if "--compute-capability" not in args:
        base += ["--compute-capability", CC]
    code, _, err = run_cli(capsys, build_cli, *base, *args)
    assert code == 2
    assert_one_line_error(err, *fragments)


def test_static_batch_export_gets_a_fixed_profile(export_cached, tmp_path, capsys):
    onnx_path = export_cached("registers_meanpool_layerscale", batch=2).path
    code, _, err = run_cli(
        capsys,
        build_cli,
        str(onnx_path),
        "-o",
        str(tmp_path / "s.plan"),
        "--backend",
        "tensorrt-rtx",
        "--compute-capability",
        CC,
        "--max-batch",
        "8",
    )
    assert code == 2
    assert_one_line_error(err, "fixed batch of 2")
    plan = build(capsys, onnx_path)
    assert read_sidecar(plan).profiles[0] == BatchProfile("pixel_values", 2, 2, 2)


def test_not_an_onnx_file(tmp_path, capsys):
    bogus = tmp_path / "model.onnx"
    bogus.write_bytes(b"\x00not onnx at all" * 10)
    code, _, err = run_cli(capsys, build_cli, str(bogus), "-o", str(tmp_path / "m.plan"))
    assert code == 2
    assert_one_line_error(err, "is not a readable ONNX file")


def test_help_and_missing_backend_without_tensorrt(tmp_path):
    """Without any TensorRT: --help works, and a build says what to install (exit 4)."""
    probe = (
        "import sys; sys.modules['tensorrt'] = None; sys.modules['tensorrt_rtx_bindings'] = None\n"
        "from tome_deploy.cli import build\n"
        "try:\n    build.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "sys.exit(build.main([sys.argv[1], '-o', sys.argv[2]]))\n"
    )
    onnx_path = write_foreign_onnx(tmp_path / "foreign.onnx")
    result = subprocess.run(
        [sys.executable, "-c", probe, str(onnx_path), str(tmp_path / "x.plan")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "usage: tome-build" in result.stdout
    assert result.returncode == 4, result.stderr
    assert_one_line_error(result.stderr, "no TensorRT backend is importable", "pip install tensorrt-rtx-cu13-libs")
    assert not (tmp_path / "x.plan").exists()


# --- fp16 export: parity budget on ONNX Runtime ----------------------------------------------------------


def _value_types(model_proto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model_proto)
    values = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


def test_fp16_export_keeps_matching_in_fp32_and_passes_its_budget(fp16_export):
    import torch

    from tome_deploy.models.loading.dispatch import load_model
    from tome_deploy.models.patch import apply_tome
    from tome_deploy.validation.probes import probe_inputs

    onnx_path, report = fp16_export
    assert report["validation"]["passed"] and report["metadata"]["precision"] == "fp16"
    assert len(report["validation"]["checks"]) == 6  # 3 probes x batch 1 and 3, within the fp16 budget

    model_proto = onnx.load(str(onnx_path))
    types = _value_types(model_proto)
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    assert types["pixel_values"] == f32 and types["logits"] == f32  # fp32 in and out
    matmul_weights = [
        t for t in model_proto.graph.initializer if t.data_type in (f32, f16) and len(t.dims) == 2 and min(t.dims) >= 16
    ]
    assert matmul_weights and all(t.data_type == f16 for t in matmul_weights)
    sensitive = [n for n in model_proto.graph.node if n.op_type in ("Log", "ReduceL2")]
    assert len(sensitive) >= 2
    for node in sensitive:  # log(size) and the metric's norm are computed in fp32
        assert types[node.input[0]] == f32, (node.op_type, node.name)

    # The budget against the fp32 model (documented in docs/tensorrt.md): same merges, small drift.
    loaded = load_model("test_vit", seed=0)
    tome_fp32, _ = apply_tome(loaded.model, 8)
    pixels = probe_inputs("natural", 2, read_metadata(onnx_path).input)
    with torch.no_grad():
        fp32_logits = tome_fp32(torch.from_numpy(pixels)).numpy()
    from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner

    with OnnxRuntimeRunner(onnx_path) as runner:
        fp16_logits = runner.infer({"pixel_values": pixels})["logits"]
    cosine = float(np.sum(fp32_logits * fp16_logits) / np.linalg.norm(fp32_logits) / np.linalg.norm(fp16_logits))
    assert cosine > 0.999 and (fp32_logits.argmax(-1) == fp16_logits.argmax(-1)).all()


# --- Polygraphy reference -------------------------------------------------------------------------------


def test_polygraphy_reads_the_saved_reference(release_export, tmp_path, capsys):
    pytest.importorskip("polygraphy", reason="polygraphy is not installed (pip install polygraphy)")
    from polygraphy.comparator import RunResults

    onnx_path = release_export("test_vit", 4, "scatter").export.path  # = tome-export test_vit --r 4 (shared, read only)
    reference = tmp_path / "ref.json"
    code, _, err = run_cli(
        capsys, validate_cli, "test_vit", str(onnx_path), "--save-reference", str(reference), "--batch-sizes", "2"
    )
    assert code == 0, err
    inputs = tmp_path / "ref_inputs.json"
    assert reference.is_file() and inputs.is_file() and "polygraphy run" in err

    def polygraphy(outputs: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                "polygraphy",
                "run",
                str(onnx_path),
                "--onnxrt",
                "--load-inputs",
                str(inputs),
                "--load-outputs",
                str(outputs),
                "--atol",
                "1e-4",
                "--rtol",
                "1e-3",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )

    result = polygraphy(reference)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Passed: 3/3 iterations" in result.stdout + result.stderr

    results = RunResults.load(str(reference))  # a wrong reference must make Polygraphy fail
    for _, iterations in results.items():
        for iteration in iterations:
            iteration["logits"] = iteration["logits"] * 1.01 + 0.01
    tampered = tmp_path / "tampered.json"
    results.save(str(tampered))
    assert polygraphy(tampered).returncode != 0


# --- engine execution (GPU + TensorRT runtime only) -----------------------------------------------------

needs_gpu = pytest.mark.skipif(
    local_compute_capability() is None, reason="no CUDA GPU: TensorRT engines cannot run here"
)


@needs_gpu
@pytest.mark.parametrize(
    "flags",
    [
        ("--r", "16"),
        ("--r", "16", "--precision", "fp16"),
        ("--r", "16", "--r-inflect", "-1"),
        ("--r", "8", "--merge", "plugin"),
    ],
    ids=["r16", "r16-fp16", "r16-inflect", "r8-plugin"],
)
def test_engine_parity_through_tensorrt(flags, tmp_path, capsys):
    """PyTorch vs the engine and vs ONNX Runtime, on every probe, at the profile's batch sizes."""
    if "plugin" in flags:
        pytest.importorskip("tensorrt", reason="the tome::TokenMerge plugin needs full TensorRT >= 10.9")
    onnx_path = export(capsys, tmp_path, "gpu", "vit_small_patch16_224", *flags, "--target", "tensorrt")
    plan = tmp_path / "gpu.plan"
    code, _, err = run_cli(capsys, build_cli, str(onnx_path), "-o", str(plan), "--max-batch", "8")
    assert code == 0, err
    code, _, err = run_cli(capsys, validate_cli, "vit_small_patch16_224", str(plan), "--batch-sizes", "1,3,8")
    assert code == 0, err
    assert "PASS" in err and "PyTorch vs onnxruntime" in err
