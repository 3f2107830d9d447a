"""`tome-deploy triton-repo --backend python` on a real Triton Inference Server (CPU, Python backend):
the repository loads, tritonclient.http and tritonclient.grpc get what ONNX Runtime gives directly,
concurrent clients are batched by Triton (its own metrics say so) and each gets its own rows back."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.triton

MODEL = "vit"
PROTOCOLS = {"http": triton_http, "grpc": triton_grpc}


@pytest.fixture(scope="module")
def triton(triton_server):
    return triton_server[0]


@pytest.fixture(scope="module")
def session(triton_server):
    return ort.InferenceSession(str(triton_server[1].path), providers=["CPUExecutionProvider"])


def client(triton, protocol: str):
    module = PROTOCOLS[protocol]
    return module.InferenceServerClient(triton.http_url if protocol == "http" else triton.grpc_url)


def pixels(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 160, 160)).astype(np.float32)


def infer(
    connection, protocol: str, x: np.ndarray, name: str = "pixel_values", datatype: str = "FP32", model: str = MODEL
) -> np.ndarray:
    module = PROTOCOLS[protocol]
    tensor = module.InferInput(name, list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return connection.infer(model, [tensor], outputs=[module.InferRequestedOutput("logits")]).as_numpy("logits")


def triton_metrics(triton) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{triton.metrics_url}/metrics", timeout=10).read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("model") == MODEL
    }


def test_generated_repository_loads_as_a_python_backend_model(triton):
    http = client(triton, "http")
    assert http.is_server_live() and http.is_server_ready() and http.is_model_ready(MODEL)
    config = http.get_model_config(MODEL)
    assert config["backend"] == "python" and config["max_batch_size"] == 8
    assert "dynamic_batching" in config
    assert json.loads(config["parameters"]["tome.tokens_per_layer"]["string_value"]) == [101 - 8 * i for i in range(7)]
    assert config["parameters"]["tome.threads"]["string_value"] == "1"
    grpc = client(triton, "grpc")
    assert grpc.is_server_ready() and grpc.is_model_ready(MODEL)


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_infer_equals_direct_onnx_runtime(triton, session, protocol):
    x = pixels(7, batch=3)
    got = infer(client(triton, protocol), protocol, x)
    np.testing.assert_allclose(got, session.run(None, {"pixel_values": x})[0], rtol=1e-5, atol=1e-5)


def test_a_model_with_its_weights_in_an_external_data_file_loads_and_infers(triton, release_export):
    """The repository of an export over 2 GiB (here test_vit r=4 written as a graph + test_vit.onnx.data):
    Triton's Python-backend model opens 1/model.onnx, which finds its weights beside it."""
    http = client(triton, "http")
    assert http.is_model_ready("vit_external")
    single = ort.InferenceSession(str(release_export("test_vit", 4, "scatter").export.path))
    x = pixels(21, batch=2)
    np.testing.assert_allclose(
        infer(http, "http", x, model="vit_external"), single.run(None, {"pixel_values": x})[0], rtol=1e-5, atol=1e-5
    )


def test_concurrent_clients_get_their_own_rows_from_batches_triton_formed(triton, session):
    clients, per_client = 16, 4
    before = triton_metrics(triton)
    results, errors = {}, []

    def loop(index: int) -> None:
        protocol = "grpc" if index % 2 else "http"
        connection = client(triton, protocol)
        try:
            for i in range(per_client):
                results[index, i] = infer(connection, protocol, pixels(100 + index * per_client + i))
        except BaseException as err:  # noqa: BLE001 - surfaced below
            errors.append(err)

    threads = [threading.Thread(target=loop, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[0]
    for (index, i), logits in results.items():
        np.testing.assert_allclose(
            logits, session.run(None, {"pixel_values": pixels(100 + index * per_client + i)})[0], rtol=1e-4, atol=1e-4
        )
    assert len(results) == clients * per_client
    after = triton_metrics(triton)
    rows = after["nv_inference_count_total"] - before.get("nv_inference_count_total", 0)
    executions = after["nv_inference_exec_count_total"] - before.get("nv_inference_exec_count_total", 0)
    assert rows == clients * per_client
    assert executions < rows  # Triton's dynamic batcher ran several requests per model call


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("case", ["shape", "dtype", "name"])
def test_wrong_shape_dtype_or_name_is_refused(triton, protocol, case):
    x = {"shape": pixels(1)[:, :, :100], "dtype": pixels(1).astype(np.float64), "name": pixels(1)}[case]
    kwargs = {"name": {"name": "image"}, "dtype": {"datatype": "FP64"}}.get(case, {})
    with pytest.raises(InferenceServerException) as caught:
        infer(client(triton, protocol), protocol, x, **kwargs)
    assert caught.value.status() in ("400", "StatusCode.INVALID_ARGUMENT"), (
        caught.value.status(),
        caught.value.message(),
    )
    assert client(triton, protocol).is_model_ready(MODEL)


def test_a_schema_2_file_of_an_earlier_release_serves_as_onnx_runtime_runs_it(triton):
    """tests/data/schema2_hf_vit_r4_scatter.onnx (tests/artifact/test_schema2_files.py says how it was written)."""
    path = Path(__file__).parents[1] / "data" / "schema2_hf_vit_r4_scatter.onnx"
    http = client(triton, "http")
    assert http.is_model_ready("schema2")
    config = http.get_model_config("schema2")
    assert config["input"][0]["dims"] == [3, 32, 32]
    assert json.loads(config["parameters"]["tome.input"]["string_value"])["shape"] == [3, 32, 32]
    x = np.random.default_rng(3).standard_normal((2, 3, 32, 32)).astype(np.float32)
    tensor = triton_http.InferInput("pixel_values", [2, 3, 32, 32], "FP32")
    tensor.set_data_from_numpy(x)
    got = http.infer("schema2", [tensor]).as_numpy("logits")
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_videomae_export_serves_as_onnx_runtime_runs_it_and_refuses_another_frame_count(triton, video_export):
    """The session's VideoMAE export (clips [4, 3, 32, 32]) as model "video": its dims are the clip's, answers
    equal ONNX Runtime's, and a clip of 2 frames is refused without taking the model down."""
    http = client(triton, "http")
    assert http.is_model_ready("video")
    assert http.get_model_config("video")["input"][0]["dims"] == [4, 3, 32, 32]
    x = np.random.default_rng(4).standard_normal((2, 4, 3, 32, 32)).astype(np.float32)
    tensor = triton_http.InferInput("pixel_values", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    got = http.infer("video", [tensor]).as_numpy("logits")
    session = ort.InferenceSession(str(video_export.path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(None, {"pixel_values": x})[0], rtol=1e-5, atol=1e-5)
    short = triton_http.InferInput("pixel_values", [2, 2, 3, 32, 32], "FP32")
    short.set_data_from_numpy(x[:, :2])
    with pytest.raises(InferenceServerException) as caught:
        http.infer("video", [short])
    assert caught.value.status() == "400", (caught.value.status(), caught.value.message())
    assert http.is_model_ready("video")


def test_an_audio_artifact_serves_as_onnx_runtime_runs_it_and_a_wrong_length_is_refused(triton, ast_cli_export):
    """The tiny AST's export (a [100, 32] (time, mel) spectrogram input; tests/models/test_hf_audio.py checks the
    export itself): Triton's dims are the spectrogram's, its answer is ONNX Runtime's, a longer clip is a 400."""
    _, code, err, path = ast_cli_export
    assert code == 0, err
    http = client(triton, "http")
    assert http.is_model_ready("audio")
    assert http.get_model_config("audio")["input"][0]["dims"] == [100, 32]
    x = np.random.default_rng(4).standard_normal((3, 100, 32)).astype(np.float32)
    tensor = triton_http.InferInput("input_values", [3, 100, 32], "FP32")
    tensor.set_data_from_numpy(x)
    got = http.infer("audio", [tensor]).as_numpy("logits")
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input_values": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    longer = triton_http.InferInput("input_values", [1, 110, 32], "FP32")
    longer.set_data_from_numpy(np.zeros((1, 110, 32), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        http.infer("audio", [longer])
    assert caught.value.status() == "400", (caught.value.status(), caught.value.message())
