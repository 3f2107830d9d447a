"""`tome-deploy triton-repo`: the config.pbtxt parses with Triton's own ModelConfig schema (shipped in
tritonclient) and every field agrees with the ONNX file, read independently with `onnx`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient
from conftest import assert_one_line_error, copy_with_quality
from google.protobuf import text_format

from tome_deploy.cli import deploy as deploy_cli


def triton_model_config_schema():
    """tritonclient/grpc/model_config_pb2.py needs only protobuf; its package __init__ needs grpcio, so load the file itself."""
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def schema():
    return triton_model_config_schema()


def parse_config(path: Path, schema):
    return text_format.Parse(path.read_text(), schema.ModelConfig())


def dims(value) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def graph_tensors(path: Path) -> tuple[list, list]:
    graph = onnx.load(str(path)).graph
    return [(v.name, dims(v)) for v in graph.input], [(v.name, dims(v)) for v in graph.output]


def test_dynamic_batch_export_gives_batched_onnxruntime_config(export_cached, tmp_path, schema, capsys):
    exported = export_cached("vit_class_token")
    repo = tmp_path / "models"
    code = deploy_cli.main(
        [
            "triton-repo",
            str(exported.path),
            str(repo),
            "--name",
            "vit_tome",
            "--max-batch",
            "16",
            "--max-delay-ms",
            "2.5",
            "--instances",
            "2",
        ]
    )
    assert code == 0
    err = capsys.readouterr().err
    assert f"tritonserver --model-repository={repo.resolve()}" in err

    config = parse_config(repo / "vit_tome" / "config.pbtxt", schema)
    ((input_name, input_dims),) = graph_tensors(exported.path)[0]
    ((output_name, output_dims),) = graph_tensors(exported.path)[1]
    assert input_dims[0] == -1 and output_dims[0] == -1  # the export's batch is dynamic
    assert config.name == "vit_tome" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert [(t.name, list(t.dims), t.data_type) for t in config.input] == [
        (input_name, input_dims[1:], schema.TYPE_FP32)
    ]
    assert [(t.name, list(t.dims), t.data_type) for t in config.output] == [
        (output_name, output_dims[1:], schema.TYPE_FP32)
    ]
    assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 2500
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, schema.ModelInstanceGroup.KIND_CPU)]
    props = {p.key: p.value for p in onnx.load(str(exported.path)).metadata_props}
    for key in ("tome.tokens_per_layer", "tome.r_effective", "tome.theoretical_speedup"):
        assert json.loads(config.parameters[key].string_value) == json.loads(props[key])
    assert config.parameters["tome.model"].string_value == json.loads(props["tome.model"]) == "test_vit"
    assert "tome.quality" not in config.parameters  # not tuned

    assert (repo / "vit_tome" / "1" / "model.onnx").read_bytes() == exported.path.read_bytes()
    assert f"tritonserver --model-repository={repo.resolve()}" in (repo / "vit_tome" / "README.md").read_text()


def test_a_recorded_quality_becomes_a_parameter(export_cached, tmp_path, schema):
    quality = {
        "metric": "accuracy_drop",
        "value": 0.4,
        "count": 899,
        "data_fingerprint": "ab" * 32,
        "metrics": {"accuracy_drop": 0.4, "top1_agreement": 0.98},
    }
    tuned = copy_with_quality(export_cached("vit_class_token").path, tmp_path / "tuned.onnx", quality)
    assert deploy_cli.main(["triton-repo", str(tuned), str(tmp_path / "models")]) == 0
    config = parse_config(tmp_path / "models" / "tuned" / "config.pbtxt", schema)
    assert json.loads(config.parameters["tome.quality"].string_value) == {
        "metric": "accuracy_drop",
        "value": 0.4,
        "count": 899,
        "data_fingerprint": "ab" * 32,
        "metrics": {"accuracy_drop": 0.4, "top1_agreement": 0.98},
    }


def test_fixed_batch_export_gives_unbatched_config_with_full_dims(export_cached, tmp_path, schema):
    exported = export_cached("vit_class_token", batch=2)
    assert deploy_cli.main(["triton-repo", str(exported.path), str(tmp_path), "--gpu"]) == 0
    name = exported.path.stem
    config = parse_config(tmp_path / name / "config.pbtxt", schema)
    ((input_name, input_dims),) = graph_tensors(exported.path)[0]
    assert input_dims[0] == 2
    assert config.name == name and config.max_batch_size == 0
    assert [(t.name, list(t.dims)) for t in config.input] == [(input_name, input_dims)]
    assert list(config.output[0].dims) == [2, 1000]
    assert not config.HasField("dynamic_batching")  # Triton cannot batch a model whose batch is fixed
    assert config.instance_group[0].kind == schema.ModelInstanceGroup.KIND_GPU


def test_existing_model_folder_is_kept_unless_overwrite(export_cached, tmp_path, capsys):
    exported = export_cached("vit_class_token")
    args = ["triton-repo", str(exported.path), str(tmp_path), "--name", "m"]
    assert deploy_cli.main(args) == 0
    marker = tmp_path / "m" / "config.pbtxt"
    marker.write_text("# edited by hand\n")
    capsys.readouterr()
    assert deploy_cli.main(args) == 2
    assert_one_line_error(capsys.readouterr().err, "already exists", "--overwrite")
    assert marker.read_text() == "# edited by hand\n"
    assert deploy_cli.main(args + ["--overwrite"]) == 0
    assert "platform" in marker.read_text()


@pytest.mark.parametrize(
    "args, code, fragments",
    [
        (["{missing}", "{repo}"], 2, ["no such artifact"]),
        (["{not_tome}", "{repo}"], 2, ["no tome-deploy metadata", "tome-export"]),
        (["{onnx}", "{repo}", "--name", "a/b"], 2, ["not a valid directory name"]),
        (["{onnx}", "{deep}"], 2, ["does not exist", "mkdir -p"]),
        (["{onnx}", "{repo}", "--max-batch", "0"], 2, ["must be >= 1"]),
    ],
    ids=["missing", "not-tome", "bad-name", "no-parent", "max-batch"],
)
def test_bad_input_is_a_one_line_error(export_cached, tmp_path, capsys, args, code, fragments):
    exported = export_cached("vit_class_token")
    not_tome = tmp_path / "plain.onnx"
    proto = onnx.load(str(exported.path))
    del proto.metadata_props[:]
    onnx.save(proto, str(not_tome))
    values = {
        "missing": str(tmp_path / "nope.onnx"),
        "not_tome": str(not_tome),
        "onnx": str(exported.path),
        "repo": str(tmp_path / "repo"),
        "deep": str(tmp_path / "a" / "b"),
    }
    assert deploy_cli.main(["triton-repo", *[a.format(**values) for a in args]]) == code
    assert_one_line_error(capsys.readouterr().err, *fragments)


def test_python_backend_repository_runs_our_runner_next_to_the_onnx_file(export_cached, tmp_path, schema):
    exported = export_cached("vit_class_token")
    assert (
        deploy_cli.main(
            ["triton-repo", str(exported.path), str(tmp_path), "--name", "vit", "--backend", "python", "--threads", "2"]
        )
        == 0
    )
    config = parse_config(tmp_path / "vit" / "config.pbtxt", schema)
    assert config.backend == "python" and config.platform == ""
    assert config.max_batch_size == 8 and config.HasField("dynamic_batching")
    assert config.parameters["tome.threads"].string_value == "2"
    assert (tmp_path / "vit" / "1" / "model.onnx").read_bytes() == exported.path.read_bytes()
    model_py = (tmp_path / "vit" / "1" / "model.py").read_text()
    assert "from tome_deploy.serving.triton_python import TritonPythonModel" in model_py
    compile(model_py, "model.py", "exec")
    assert "TOME_DEPLOY_PYTHONPATH" in (tmp_path / "vit" / "README.md").read_text()


def test_threads_without_the_python_backend_is_a_one_line_error(export_cached, tmp_path, capsys):
    exported = export_cached("vit_class_token")
    assert deploy_cli.main(["triton-repo", str(exported.path), str(tmp_path), "--threads", "2"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--threads applies to --backend python")


@pytest.mark.parametrize("backend", ["platform", "python"])
def test_an_export_with_external_data_goes_in_with_its_data_file(external_data_export, tmp_path, schema, backend):
    """1/model.onnx keeps naming its weights test_vit.onnx.data, so that file goes next to it unchanged, and
    ONNX Runtime opening 1/model.onnx by path (as Triton's backends do) computes what the export computes."""
    path = external_data_export.export.path
    assert deploy_cli.main(["triton-repo", str(path), str(tmp_path), "--name", "vit", "--backend", backend]) == 0
    version = tmp_path / "vit" / "1"
    expected = ["model.onnx", "test_vit.onnx.data"] + (["model.py"] if backend == "python" else [])
    assert sorted(p.name for p in version.iterdir()) == sorted(expected)
    assert (version / "model.onnx").read_bytes() == path.read_bytes()
    assert (version / "test_vit.onnx.data").read_bytes() == path.with_name("test_vit.onnx.data").read_bytes()
    config = parse_config(tmp_path / "vit" / "config.pbtxt", schema)
    assert config.max_batch_size == 8 and [i.name for i in config.input] == ["pixel_values"]
    x = np.random.default_rng(2).standard_normal((2, 3, 160, 160)).astype(np.float32)
    in_repo = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    exported = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        in_repo.run(None, {"pixel_values": x})[0], exported.run(None, {"pixel_values": x})[0], rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize(
    "location, fragments",
    [
        ("../outside.data", ["keeps weights at '../outside.data', which is not a file beside it"]),
        ("weights.onnx", ["keeps its weights in weights.onnx, a name Triton would take for a model file"]),
    ],
    ids=["outside-the-folder", "model-file-name"],
)
def test_external_data_outside_the_folder_or_named_like_a_model_file_is_refused(
    external_data_export, tmp_path, capsys, location, fragments
):
    """A crafted graph cannot make triton-repo copy a file from elsewhere, nor put one over a model file."""
    source = external_data_export.export.path
    model = onnx.load(str(source), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    folder = tmp_path / "export"
    folder.mkdir()
    onnx.save(model, str(folder / "crafted.onnx"))
    (folder / location).write_bytes(source.with_name("test_vit.onnx.data").read_bytes())
    assert deploy_cli.main(["triton-repo", str(folder / "crafted.onnx"), str(tmp_path / "repo")]) == 2
    assert_one_line_error(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "repo").exists()
