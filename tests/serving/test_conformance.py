"""One KServe v2 protocol suite, run with tritonclient against tome-serve and against a real Triton
Inference Server (Python backend) serving the same ONNX file as model "vit". Where the two answer
differently, DIFFERENCES pins each server's answer: it is docs/serving.md's differences table, as data."""

from __future__ import annotations

import http.client
import json

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http
from test_serve_http import serving
from tritonclient.utils import InferenceServerException

from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner
from tome_deploy.serving.batcher import BatchPolicy
from tome_deploy.serving.served_model import read_served_model

pytestmark = pytest.mark.triton

MODEL = "vit"
INPUT = {"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, 160, 160]}
OUTPUT = {"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}


@pytest.fixture(scope="module", params=["tome-serve", "triton"])
def server(request, triton_server):
    """(which, host:port) of a server serving test_vit r=8 as "vit" with max batch 8."""
    if request.param == "triton":
        yield "triton", triton_server[0].http_url
        return
    served_model = read_served_model(triton_server[1].path)
    with serving(
        served_model, OnnxRuntimeRunner(served_model.path, threads=1), policy=BatchPolicy(max_batch=8)
    ) as served:
        yield "tome-serve", served.url


@pytest.fixture(scope="module")
def session(triton_server):
    return ort.InferenceSession(str(triton_server[1].path), providers=["CPUExecutionProvider"])


def raw(url: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    host, port = url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def pixels(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 160, 160)).astype(np.float32)


def test_server_metadata_structure(server):
    meta = triton_http.InferenceServerClient(server[1]).get_server_metadata()
    assert set(meta) == {"name", "version", "extensions"}
    assert (
        isinstance(meta["name"], str)
        and isinstance(meta["version"], str)
        and "binary_tensor_data" in meta["extensions"]
    )


def test_model_metadata_structure(server):
    meta = triton_http.InferenceServerClient(server[1]).get_model_metadata(MODEL)
    assert {"name", "versions", "platform", "inputs", "outputs"} <= set(meta)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert meta["inputs"] == [INPUT] and meta["outputs"] == [OUTPUT]
    assert meta["platform"] == {"tome-serve": "onnxruntime_onnx", "triton": "python"}[server[0]]


def test_health_endpoints(server):
    client = triton_http.InferenceServerClient(server[1])
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version="1") and not client.is_model_ready("nope")
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        f"/v2/models/{MODEL}/ready",
        f"/v2/models/{MODEL}/versions/1/ready",
    ):
        assert raw(server[1], "GET", path)[0] == 200, path


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_onnx_runtime(server, session, binary):
    x = pixels(3, batch=2)
    tensor = triton_http.InferInput("pixel_values", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = triton_http.InferenceServerClient(server[1]).infer(
        MODEL, [tensor], outputs=[triton_http.InferRequestedOutput("logits", binary_data=binary)], request_id="req-7"
    )
    assert result.get_response()["id"] == "req-7" and result.get_response()["model_name"] == MODEL
    np.testing.assert_allclose(
        result.as_numpy("logits"), session.run(None, {"pixel_values": x})[0], rtol=1e-5, atol=1e-5
    )


def test_timeout_parameter_is_accepted(server, session):
    x = pixels(4)
    tensor = triton_http.InferInput("pixel_values", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = triton_http.InferenceServerClient(server[1]).infer(MODEL, [tensor], timeout=10_000_000)  # microseconds
    np.testing.assert_allclose(
        result.as_numpy("logits"), session.run(None, {"pixel_values": x})[0], rtol=1e-5, atol=1e-5
    )


def tensor(shape, datatype="FP32", name="pixel_values", count=None) -> dict:
    return {
        "name": name,
        "shape": shape,
        "datatype": datatype,
        "data": [0.5] * (int(np.prod(shape)) if count is None else count),
    }


def infer_body(*tensors, **extra) -> bytes:
    return json.dumps({"inputs": list(tensors), **extra}).encode()


# (method, path, body) -> the same status from both servers, with an {"error": message} body.
SAME_ANSWER = {
    "unknown-model": ("POST", "/v2/models/nope/infer", infer_body(tensor([1, 3, 160, 160])), 404),
    "unknown-version": ("GET", f"/v2/models/{MODEL}/versions/2", None, 404),
    "unknown-model-metadata": ("GET", "/v2/models/nope", None, 404),
    "wrong-name": ("POST", f"/v2/models/{MODEL}/infer", infer_body(tensor([1, 3, 160, 160], name="image")), 400),
    "wrong-shape": ("POST", f"/v2/models/{MODEL}/infer", infer_body(tensor([1, 3, 100, 160])), 400),
    "wrong-dtype": ("POST", f"/v2/models/{MODEL}/infer", infer_body(tensor([1, 3, 160, 160], datatype="FP64")), 400),
    "batch-too-large": ("POST", f"/v2/models/{MODEL}/infer", infer_body(tensor([9, 3, 160, 160])), 400),
    "no-inputs": ("POST", f"/v2/models/{MODEL}/infer", infer_body(), 400),
    "non-finite-input": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        infer_body(tensor([1, 3, 160, 160])).replace(b"0.5", b"NaN", 1),
        400,
    ),
}

# docs/serving.md's differences table: case -> (tome-serve status, Triton status).
DIFFERENCES = {
    "ready-of-unknown-model": ("GET", "/v2/models/nope/ready", None, (404, 400)),
    "data-count-mismatch": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        infer_body(tensor([1, 3, 160, 160], count=7)),
        (400, 500),
    ),
    "body-not-json": ("POST", f"/v2/models/{MODEL}/infer", b"{nope", (400, 500)),
    "name-is-a-list": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        infer_body(tensor([1, 3, 160, 160], name=["pixel_values"])),
        (400, 500),
    ),
    "timeout-not-an-integer": (
        "POST",
        f"/v2/models/{MODEL}/infer",
        infer_body(tensor([1, 3, 160, 160]), parameters={"timeout": "x"}),
        (400, 500),
    ),
}


@pytest.mark.parametrize("case", sorted(SAME_ANSWER))
def test_error_status_codes_agree(server, case):
    method, path, body, expected = SAME_ANSWER[case]
    status, payload = raw(server[1], method, path, body)
    assert status == expected, payload
    message = json.loads(payload)["error"]
    assert isinstance(message, str) and message


@pytest.mark.parametrize("case", sorted(DIFFERENCES))
def test_documented_differences(server, case):
    method, path, body, (tome_status, triton_status) = DIFFERENCES[case]
    status, payload = raw(server[1], method, path, body)
    assert status == {"tome-serve": tome_status, "triton": triton_status}[server[0]], payload
    assert json.loads(payload)["error"]


def test_tritonclient_sees_the_same_exception_status(server):
    x = pixels(0, batch=9)
    tensor_in = triton_http.InferInput("pixel_values", list(x.shape), "FP32")
    tensor_in.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as caught:
        triton_http.InferenceServerClient(server[1]).infer(MODEL, [tensor_in])
    assert caught.value.status() == "400" and "8" in caught.value.message()
