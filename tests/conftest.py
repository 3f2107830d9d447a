"""Shared fixtures: small timm ViTs of every supported family, exported once per test session."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import timm
import torch

from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.models.patch import apply_tome
from tome_deploy.onnx_export.export import export_onnx
from tome_deploy.onnx_export.metadata import build_metadata

# name -> (timm model, create kwargs, schedule, merge formulation). An export's cost grows with the number
# of blocks traced, not with their width: small image sizes and 3 or 4 blocks keep exports fast (a block
# that receives merged tokens, with proportional attention, is in every one). vit_class_token keeps
# test_vit's 6 blocks: the server, Triton and CLI tests are written against that model.
FAMILIES = {
    "vit_class_token": ("test_vit", {}, 8, "scatter"),
    "registers_meanpool_layerscale": ("test_vit2", {"depth": 3}, (8, -1.0), "matmul"),
    "map_pool": ("test_vit3", {"depth": 3}, 6, "scatter"),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {"img_size": 96, "depth": 3}, 4, "scatter"),
    "deit3_qknorm": (
        "vit_tiny_patch16_224",
        {"img_size": 96, "qk_norm": True, "init_values": 0.1, "depth": 4},
        [6, 5, 4],
        "matmul",
    ),
}


def make_model(name: str, kwargs: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = timm.create_model(name, **kwargs).eval()
    # timm initialises LayerScale to a constant; random gammas make the test sensitive to ls1/ls2.
    for module in model.modules():
        if hasattr(module, "gamma"):
            module.gamma.data = 0.1 + 0.5 * torch.rand_like(module.gamma)
    return model


@dataclass
class Exported:
    family: str
    model: torch.nn.Module  # the unpatched model
    tome: torch.nn.Module
    metadata: ToMeMetadata
    path: Path


def export_family(family: str, folder: Path, *, merge: str | None = None, batch: int | None = None) -> Exported:
    """batch: None for a dynamic batch (traced at 2) or a fixed size such as 2."""
    name, kwargs, r, default_merge = FAMILIES[family]
    example_batch = batch or 2
    merge = merge or default_merge
    model = make_model(name, kwargs)
    tome, schedule = apply_tome(model, r, merge)
    metadata = build_metadata(
        tome,
        schedule,
        r,
        arch=name,
        weights="random init (test)",
        weights_sha256="test",
        merge=merge,
        opset=18,
        batch=batch,
        example_batch=example_batch,
    )
    path = export_onnx(tome, metadata, folder / f"{family}_{merge}_{batch or 'dynamic'}.onnx").path
    return Exported(family, model, tome, metadata, path)


@pytest.fixture(scope="session")
def export_cached(tmp_path_factory):
    """Exports take seconds each: every (family, merge, batch) is exported once per session."""
    cache: dict[tuple, Exported] = {}

    def get(family: str, merge: str | None = None, batch: int | None = None) -> Exported:
        key = (family, merge or FAMILIES[family][3], batch)
        if key not in cache:
            cache[key] = export_family(family, tmp_path_factory.mktemp("onnx"), merge=key[1], batch=batch)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def release_export(tmp_path_factory):
    """The export recipe of the 0.1.0 release's golden logits (tests/data/golden_logits.npz):
    `export_model(ModelSource(model, seed=0), r=r, merge=merge, validate=False)`, dynamic batch, default
    opset. Every (model, r, merge) is exported once per session and shared by the files that compare with
    the release (test_export_unchanged, test_openvino) or reuse the file (test_tensorrt_build); a ViT-S
    export alone takes 15-30 s. Returns the ExportOutcome (loaded model, schedule, path, metadata)."""
    from tome_deploy.jobs.export import export_model
    from tome_deploy.models.loading.source import ModelSource

    cache: dict[tuple, object] = {}

    def get(model: str, r: int, merge: str):
        key = (model, r, merge)
        if key not in cache:
            path = tmp_path_factory.mktemp("release") / f"{model}_r{r}_{merge}.onnx"
            cache[key] = export_model(ModelSource(model, seed=0), path, r=r, merge=merge, validate=False)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def external_data_export(tmp_path_factory):
    """`tome-export test_vit --r 4 --external-data` (validated in ONNX Runtime while staged): test_vit.onnx
    and its weights in test_vit.onnx.data, the layout of every export over 2 GiB. The same export as
    release_export("test_vit", 4, "scatter"), which is its single-file reference. Returns the ExportOutcome."""
    from tome_deploy.jobs.export import export_model
    from tome_deploy.models.loading.source import ModelSource

    path = tmp_path_factory.mktemp("external") / "test_vit.onnx"
    outcome = export_model(ModelSource("test_vit", seed=0), path, r=4, merge="scatter", external_data=True)
    assert outcome.validation is not None and outcome.validation.passed, outcome.validation
    return outcome


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def exported_family(request, export_cached) -> Exported:
    return export_cached(request.param)


def copy_with_quality(source: Path, path: Path, quality: dict) -> Path:
    """The ONNX file `source` copied to `path` with `quality` recorded as tome-export --schedule-from records it."""
    model = onnx.load(str(source))
    entry = model.metadata_props.add()
    entry.key, entry.value = "tome.quality", json.dumps(quality)
    onnx.save(model, str(path))
    return path


def assert_one_line_error(err: str, *fragments: str) -> None:
    """A CLI failure is exactly one `error: ...` line containing every fragment, and no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def ast_folders(tmp_path_factory) -> dict[str, str]:
    """Audio Spectrogram Transformer class name -> its save_pretrained folder (family_sources.hf_ast_folder)."""
    from family_sources import hf_ast_folder

    root = tmp_path_factory.mktemp("hf_ast")
    return {name: hf_ast_folder(root / name, name).name for name in ("ASTForAudioClassification", "ASTModel")}


AST_R = 3


@pytest.fixture(scope="session")
def ast_cli_export(ast_folders, tmp_path_factory) -> tuple[str, int, str, Path]:
    """`tome-export FOLDER --r 3 -o PATH` on the ASTForAudioClassification folder (scatter, dynamic batch,
    validated in ONNX Runtime): (folder, exit code, stderr, PATH)."""
    import contextlib
    import io

    from tome_deploy.cli import export as export_cli

    folder = ast_folders["ASTForAudioClassification"]
    path = tmp_path_factory.mktemp("ast_cli") / f"ast_r{AST_R}.onnx"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = export_cli.main([folder, "--r", str(AST_R), "-o", str(path)])
    return folder, code, err.getvalue(), path


@pytest.fixture(scope="session")
def triton_server(export_cached, video_export, ast_cli_export, external_data_export, tmp_path_factory):
    """A real tritonserver (tests/triton_server.py) serving test_vit r=8 as model "vit", the schema-2 file
    tests/data/schema2_hf_vit_r4_scatter.onnx (written by an earlier release) as model "schema2", the session's
    VideoMAE export (`video_export`) as model "video" and the tiny AST's export (ast_cli_export, a spectrogram
    input) as model "audio" and `external_data_export` (an ONNX graph with its weights in a file beside it) as
    model "vit_external", all through `tome-deploy triton-repo --backend python`; yields (server, the Exported
    test_vit)."""
    from triton_server import start_tritonserver, stop_tritonserver

    from tome_deploy.serving.served_model import read_served_model
    from tome_deploy.serving.triton_repo import TritonOptions, write_triton_repo

    exported = export_cached("vit_class_token")
    root = tmp_path_factory.mktemp("triton")
    options = TritonOptions("vit", max_batch=8, max_queue_delay_us=10_000, backend="python", threads=1)
    write_triton_repo(read_served_model(exported.path), root / "models", options)
    schema2 = Path(__file__).parent / "data" / "schema2_hf_vit_r4_scatter.onnx"
    write_triton_repo(read_served_model(schema2), root / "models", dataclasses.replace(options, model_name="schema2"))
    video = read_served_model(video_export.path)
    write_triton_repo(video, root / "models", dataclasses.replace(options, model_name="video"))
    audio = ast_cli_export[3]
    write_triton_repo(read_served_model(audio), root / "models", dataclasses.replace(options, model_name="audio"))
    external = dataclasses.replace(options, model_name="vit_external")
    write_triton_repo(read_served_model(external_data_export.export.path), root / "models", external)
    server = start_tritonserver(root / "models", root / "tritonserver.log")
    try:
        yield server, exported
    finally:
        stop_tritonserver(server)


def io_symbolic_dims(graph) -> set[str]:
    """The symbolic dimension names of an ONNX graph's inputs and outputs."""
    return {
        d.dim_param
        for v in list(graph.input) + list(graph.output)
        for d in v.type.tensor_type.shape.dim
        if d.HasField("dim_param")
    }


@dataclass
class VideoExport:
    folder: Path  # the save_pretrained VideoMAEForVideoClassification folder
    path: Path  # what `tome-export FOLDER --r 6 -o PATH --report ...` wrote
    report: dict  # its --report JSON
    stderr: str  # what the command printed
    exit_code: int


@pytest.fixture(scope="session")
def video_export(tmp_path_factory) -> VideoExport:
    """A VideoMAEForVideoClassification folder (family_sources.hf_video_folder: clips of 4 frames of 32 x 32, 32
    tubelet tokens, 2 layers) exported once per session by the CLI, as a user runs it: `tome-export FOLDER --r 6`
    (scatter, dynamic batch, validated in ONNX Runtime). The export, serving and Triton tests share it."""
    import contextlib
    import io

    from family_sources import hf_video_folder

    from tome_deploy.cli import export as export_cli

    root = tmp_path_factory.mktemp("video_export")
    folder = Path(hf_video_folder(root / "videomae", "VideoMAEForVideoClassification").name)
    path, report = root / "videomae_r6.onnx", root / "report.json"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = export_cli.main([str(folder), "--r", "6", "-o", str(path), "--report", str(report)])
    return VideoExport(folder, path, json.loads(report.read_text()) if report.exists() else {}, stderr.getvalue(), code)


def build_rtx_engine(onnx_path: Path, plan: Path, capsys):
    """`tome-build ONNX -o PLAN --backend tensorrt-rtx --compute-capability 89 --max-batch 4` (the test is
    skipped without TensorRT-RTX); asserts exit 0 and returns the sidecar it wrote beside PLAN."""
    pytest.importorskip(
        "tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed (pip install 'tome-deploy[tensorrt-rtx]')"
    )
    from tome_deploy.artifact.sidecar import read_sidecar
    from tome_deploy.cli import build as build_cli

    argv = [str(onnx_path), "-o", str(plan), "--backend", "tensorrt-rtx", "--compute-capability", "89"]
    assert build_cli.main([*argv, "--max-batch", "4"]) == 0, capsys.readouterr().err
    return read_sidecar(plan)
