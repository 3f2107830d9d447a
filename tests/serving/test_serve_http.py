"""tome-serve end to end: the real server on a loopback port, the real `tritonclient.http` client, and
ONNX Runtime run directly on the same inputs as the reference."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http
from conftest import assert_one_line_error, copy_with_quality
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tome_deploy.cli import serve as serve_cli
from tome_deploy.runtime.base import Runner
from tome_deploy.runtime.onnxruntime import OnnxRuntimeRunner
from tome_deploy.serving.app import ServeSettings, build_app
from tome_deploy.serving.batcher import BatchPolicy
from tome_deploy.serving.served_model import read_served_model
from tome_deploy.serving.server import ConnectionLimits, bind_socket, uvicorn_server

MODEL = "vit"


class GatedRunner(Runner):
    """The real ONNX Runtime runner, held at a gate the test opens: makes queueing deterministic."""

    name = "gated"

    def __init__(self, runner: Runner):
        super().__init__()
        self.runner, self.gate, self.entered = runner, threading.Event(), threading.Event()

    def _load(self):
        self.runner.activate()

    def _run(self, feed):
        self.entered.set()
        assert self.gate.wait(30), "test gate never opened"
        return self.runner.infer(feed)

    def _release(self):
        self.runner.deactivate()


class Served:
    def __init__(self, url: str, server):
        self.url, self.server = url, server

    def client(self) -> triton_http.InferenceServerClient:
        return triton_http.InferenceServerClient(self.url, network_timeout=60)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, bytes]:
        host, port = self.url.split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=60)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def metrics(self) -> dict[str, float]:
        status, body = self.raw("GET", "/metrics")
        assert status == 200
        return {
            (s.name + json.dumps(s.labels, sort_keys=True)): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }


@contextlib.contextmanager
def serving(served_model, runner, limits: ConnectionLimits | None = None, **settings):
    """The app under uvicorn in a thread on a free loopback port, the runner active while it serves (as
    tome-serve does); always shut down, even on failure."""
    app = build_app(served_model, runner, ServeSettings(model_name=MODEL, **settings))
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn_server(app, graceful_timeout_s=20, limits=limits or ConnectionLimits())
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    runner.activate()
    thread.start()
    try:
        for _ in range(600):
            if server.started or not thread.is_alive():
                break
            time.sleep(0.05)
        assert server.started, "server did not start"
        yield Served(f"127.0.0.1:{sock.getsockname()[1]}", server)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        runner.deactivate()
        assert not thread.is_alive(), "server did not stop"


@pytest.fixture(scope="module")
def exported(export_cached):
    return export_cached("vit_class_token")  # test_vit, r=8, dynamic batch


@pytest.fixture(scope="module")
def served_model(exported):
    return read_served_model(exported.path)


@pytest.fixture(scope="module")
def session(exported):
    return ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def server(served_model):
    policy = BatchPolicy(max_batch=8, max_delay_s=0.01, max_queue=256)
    with serving(served_model, OnnxRuntimeRunner(served_model.path), policy=policy) as served:
        yield served


def pixels(seed: int, batch: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 160, 160)).astype(np.float32)


def direct(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {"pixel_values": x})[0]


def infer(client, x: np.ndarray, binary: bool = True, **kwargs) -> np.ndarray:
    tensor = triton_http.InferInput("pixel_values", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [triton_http.InferRequestedOutput("logits", binary_data=binary)]
    return client.infer(MODEL, [tensor], outputs=outputs, **kwargs).as_numpy("logits")


def test_health_and_metadata_match_the_artifact(server, exported):
    client = server.client()
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    graph = onnx.load(str(exported.path)).graph
    meta = client.get_model_metadata(MODEL)
    assert meta["name"] == MODEL and meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    graph_input = graph.input[0].type.tensor_type
    assert meta["inputs"] == [
        {
            "name": graph.input[0].name,
            "datatype": "FP32",
            "shape": [-1] + [d.dim_value for d in graph_input.shape.dim[1:]],
        }
    ]
    assert meta["outputs"] == [{"name": graph.output[0].name, "datatype": "FP32", "shape": [-1, 1000]}]
    props = {p.key: json.loads(p.value) for p in onnx.load(str(exported.path)).metadata_props}
    assert meta["tome"]["tokens_per_layer"] == props["tome.tokens_per_layer"] == [101 - 8 * i for i in range(7)]
    assert meta["tome"]["r_effective"] == props["tome.r_effective"] and meta["tome"]["model"] == "test_vit"
    assert "parameters" not in meta  # no quality recorded: the export was not tuned
    assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
    assert client.get_model_metadata(MODEL, model_version="1")["name"] == MODEL
    assert not client.is_model_ready("other")


def test_model_metadata_shows_the_recorded_quality(exported, tmp_path):
    quality = {
        "metric": "top1_agreement",
        "value": 0.98,
        "count": 512,
        "data_fingerprint": "12" * 32,
        "metrics": {"top1_agreement": 0.98, "mean_kl": 0.01},
    }
    served_model = read_served_model(copy_with_quality(exported.path, tmp_path / "tuned.onnx", quality))
    with serving(served_model, OnnxRuntimeRunner(served_model.path)) as served:
        meta = served.client().get_model_metadata(MODEL)
    assert meta["parameters"] == {
        "tome_quality": {
            "metric": "top1_agreement",
            "value": 0.98,
            "count": 512,
            "data_fingerprint": "12" * 32,
            "metrics": {"top1_agreement": 0.98, "mean_kl": 0.01},
        }
    }
    assert meta["tome"]["r_effective"] == [8] * 6


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_equals_direct_onnx_runtime(server, session, binary):
    x = pixels(1, batch=3)
    np.testing.assert_allclose(infer(server.client(), x, binary=binary), direct(session, x), rtol=1e-5, atol=1e-5)


def test_concurrent_clients_get_their_own_results_in_real_batches_while_health_answers(server, session):
    clients, per_client = 16, 30
    before = server.metrics()
    results: dict[tuple[int, int], np.ndarray] = {}
    errors: list[BaseException] = []
    health: list[bool] = []
    load_done = threading.Event()

    def client_loop(index: int) -> None:
        try:
            client = server.client()
            for i in range(per_client):
                results[index, i] = infer(client, pixels(1000 + index * per_client + i))
        except BaseException as err:  # noqa: BLE001 - surfaced in the main thread below
            errors.append(err)

    def health_loop() -> None:
        client = server.client()
        while not load_done.is_set():
            health.append(client.is_server_ready())
            time.sleep(0.02)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    monitor = threading.Thread(target=health_loop)
    monitor.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    load_done.set()
    monitor.join(30)
    assert not errors, errors[0]
    assert len(results) == clients * per_client
    for (index, i), logits in results.items():
        np.testing.assert_allclose(logits, direct(session, pixels(1000 + index * per_client + i)), rtol=1e-4, atol=1e-4)
    assert len(health) >= 3 and all(health)

    after = server.metrics()
    batches = after["tome_batch_size_count{}"] - before.get("tome_batch_size_count{}", 0)
    rows = after["tome_batch_size_sum{}"] - before.get("tome_batch_size_sum{}", 0)
    singles = after['tome_batch_size_bucket{"le": "1.0"}'] - before.get('tome_batch_size_bucket{"le": "1.0"}', 0)
    assert [f"{size}.0" for size in range(1, 9)] == [
        key.split('"le": "')[1].split('"')[0]
        for key in after
        if key.startswith("tome_batch_size_bucket") and "+Inf" not in key
    ]  # one per size
    assert rows == clients * per_client
    assert batches < rows and singles < batches  # batches larger than one formed
    assert (
        after['tome_requests_total{"code": "200", "endpoint": "infer"}']
        - before.get('tome_requests_total{"code": "200", "endpoint": "infer"}', 0)
        == rows
    )


def post_infer(server, request: dict, binary: bytes = b"") -> tuple[int, str]:
    header = json.dumps(request).encode()
    headers = {"Content-Type": "application/json"}
    if binary:
        headers["Inference-Header-Content-Length"] = str(len(header))
    status, body = server.raw("POST", f"/v2/models/{MODEL}/infer", header + binary, headers)
    return status, json.loads(body).get("error", "") if status != 200 else ""


def tensor(shape, datatype="FP32", name="pixel_values", data=None) -> dict:
    count = int(np.prod(shape))
    return {"name": name, "shape": list(shape), "datatype": datatype, "data": [0.5] * count if data is None else data}


@pytest.mark.parametrize(
    "request_body, status, fragment",
    [
        ({"inputs": [tensor([1, 3, 160, 160], name="image")]}, 400, "unknown input 'image'"),
        (
            {"inputs": [tensor([1, 3, 128, 128])]},
            400,
            "has shape [1, 3, 128, 128]; the model takes [batch, 3, 160, 160]",
        ),
        ({"inputs": [tensor([1, 3, 160, 160], datatype="FP64")]}, 400, "datatype 'FP64'; the model takes FP32"),
        ({"inputs": [tensor([9, 3, 16, 16])]}, 400, "shape [9, 3, 16, 16]"),
        ({"inputs": [tensor([1, 3, 160, 160], data=[0.5] * 7)]}, 400, "has 7 values"),
        ({"inputs": [tensor([1, 3, 160, 160], data=["a"] * 76800)]}, 400, "numbers only"),
        ({"inputs": []}, 400, "needs an 'inputs' list"),
    ],
    ids=["name", "shape", "dtype", "shape-and-batch", "count", "strings", "no-inputs"],
)
def test_bad_json_requests_get_4xx_with_a_message(server, request_body, status, fragment):
    got, message = post_infer(server, request_body)
    assert got == status and fragment in message, message


def test_wrong_batch_non_finite_and_malformed_requests_get_400_and_server_stays_healthy(server, session):
    client = server.client()
    with pytest.raises(InferenceServerException, match="batch 9; send 1 to 8 rows") as caught:
        infer(client, pixels(0, batch=9))
    assert caught.value.status() == "400"
    bad = pixels(0)
    bad[0, 1, 5, 5] = np.nan
    bad[0, 2, 7, 7] = np.inf
    with pytest.raises(InferenceServerException, match="2 non-finite values") as caught:
        infer(client, bad)
    assert caught.value.status() == "400"
    header = {
        "inputs": [
            {
                "name": "pixel_values",
                "shape": [1, 3, 160, 160],
                "datatype": "FP32",
                "parameters": {"binary_data_size": 100},
            }
        ]
    }
    assert "binary_data_size 100" in post_infer(server, header, b"\0" * 100)[1]
    status, body = server.raw("POST", f"/v2/models/{MODEL}/infer", b"{not json", {})
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]
    status, body = server.raw("POST", "/v2/models/resnet/infer", b"{}", {})
    assert status == 404 and "serves 'vit'" in json.loads(body)["error"]
    status, body = server.raw("POST", f"/v2/models/{MODEL}/infer", b"x", {"Content-Encoding": "gzip"})
    assert status == 415
    assert client.is_server_ready()
    np.testing.assert_allclose(infer(client, pixels(2)), direct(session, pixels(2)), rtol=1e-5, atol=1e-5)


def encoded(image: Image.Image, fmt: str) -> bytes:
    stream = io.BytesIO()
    image.save(stream, format=fmt)
    return stream.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_image_endpoint_returns_top_k_of_timms_eval_transform(server, session, exported, fmt):
    from timm.data import create_transform, resolve_data_config

    rng = np.random.default_rng(5)
    image = Image.fromarray(rng.integers(0, 256, (190, 240, 3), dtype=np.uint8))
    body = encoded(image, fmt)
    status, response = server.raw(
        "POST", f"/v2/models/{MODEL}/classify?top_k=3", body, {"Content-Type": f"image/{fmt.lower()}"}
    )
    assert status == 200, response
    predictions = json.loads(response)["predictions"]
    # Reference: timm's own eval transform on the decoded image, ONNX Runtime, softmax in numpy.
    transform = create_transform(**resolve_data_config(model=exported.model), is_training=False)
    x = transform(Image.open(io.BytesIO(body)).convert("RGB")).numpy()[None]
    logits = direct(session, x)[0].astype(np.float64)
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    top = np.argsort(-probabilities)[:3]
    assert [p["index"] for p in predictions] == top.tolist()
    np.testing.assert_allclose([p["score"] for p in predictions], probabilities[top], rtol=1e-3)


def test_undecodable_image_and_bad_top_k_get_400(server):
    status, body = server.raw("POST", f"/v2/models/{MODEL}/classify", b"GIF89a not really", {})
    assert status == 400 and "not a decodable image" in json.loads(body)["error"]
    status, body = server.raw(
        "POST", f"/v2/models/{MODEL}/classify?top_k=0", encoded(Image.new("RGB", (20, 20)), "PNG"), {}
    )
    assert status == 400 and "top_k is 0" in json.loads(body)["error"]
    assert server.client().is_server_ready()


def test_oversized_body_gets_413_and_server_stays_healthy(served_model, session):
    with serving(served_model, OnnxRuntimeRunner(served_model.path), max_body_bytes=200_000) as served:
        client = served.client()
        with pytest.raises(InferenceServerException, match="over the limit of 200000") as caught:
            infer(client, pixels(0))  # 307,200 bytes of pixels
        assert caught.value.status() == "413"
        assert client.is_server_ready()
        status, _ = served.raw("POST", f"/v2/models/{MODEL}/classify", b"\xff" * 300_000, {})
        assert status == 413
        status, _ = served.raw("POST", f"/v2/models/{MODEL}/classify", encoded(Image.new("RGB", (64, 48)), "PNG"), {})
        assert status == 200  # a body under the limit is still served


def start_in_thread(function, *args) -> tuple[threading.Thread, list]:
    box: list = []

    def run():
        try:
            box.append(function(*args))
        except BaseException as err:  # noqa: BLE001 - handed back to the caller
            box.append(err)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_full_queue_answers_503_then_queued_requests_complete(served_model, session):
    gated = GatedRunner(OnnxRuntimeRunner(served_model.path))
    with serving(served_model, gated, policy=BatchPolicy(max_batch=1, max_delay_s=0, max_queue=2)) as served:
        first = start_in_thread(infer, served.client(), pixels(10))
        wait_for(gated.entered.is_set)
        queued = [start_in_thread(infer, served.client(), pixels(seed)) for seed in (11, 12)]
        wait_for(lambda: served.metrics()["tome_queue_depth{}"] == 2)
        with pytest.raises(InferenceServerException, match="queue is full") as caught:
            infer(served.client(), pixels(13))
        assert caught.value.status() == "503"
        assert served.client().is_server_ready()  # health still answers while the model is busy
        gated.gate.set()
        for seed, (thread, box) in zip((10, 11, 12), [first, *queued]):
            thread.join(60)
            np.testing.assert_allclose(box[0], direct(session, pixels(seed)), rtol=1e-5, atol=1e-5)


def test_request_timeout_answers_504_and_server_recovers(served_model, session):
    gated = GatedRunner(OnnxRuntimeRunner(served_model.path))
    with serving(served_model, gated, policy=BatchPolicy(max_batch=1, max_delay_s=0)) as served:
        first = start_in_thread(infer, served.client(), pixels(20))
        wait_for(gated.entered.is_set)
        with pytest.raises(InferenceServerException, match="did not finish within 0.2s") as caught:
            infer(served.client(), pixels(21), timeout=200_000)  # microseconds, as Triton's clients send it
        assert caught.value.status() == "504"
        gated.gate.set()
        first[0].join(60)
        np.testing.assert_allclose(first[1][0], direct(session, pixels(20)), rtol=1e-5, atol=1e-5)
        assert served.metrics()["tome_batch_size_count{}"] == 1  # the timed-out request was never computed


def test_graceful_shutdown_answers_in_flight_requests(served_model, session):
    gated = GatedRunner(OnnxRuntimeRunner(served_model.path))
    with serving(served_model, gated, policy=BatchPolicy(max_batch=2, max_delay_s=0)) as served:
        in_flight = [start_in_thread(infer, served.client(), pixels(seed)) for seed in range(30, 34)]
        wait_for(gated.entered.is_set)
        wait_for(lambda: served.metrics()["tome_queue_depth{}"] >= 2)
        served.server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        gated.gate.set()
        for seed, (thread, box) in zip(range(30, 34), in_flight):
            thread.join(60)
            assert not isinstance(box[0], BaseException), box[0]
            np.testing.assert_allclose(box[0], direct(session, pixels(seed)), rtol=1e-5, atol=1e-5)


def test_fixed_batch_export_serves_fewer_rows_by_padding(export_cached):
    exported = export_cached("vit_class_token", batch=2)
    served_model = read_served_model(exported.path)
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    with serving(served_model, OnnxRuntimeRunner(served_model.path), policy=BatchPolicy(max_batch=8)) as served:
        client = served.client()
        assert client.get_model_metadata(MODEL)["max_batch_size"] == 2
        x = pixels(40)
        reference = direct(session, np.concatenate([x, pixels(41)]))[:1]
        np.testing.assert_allclose(infer(client, x), reference, rtol=1e-4, atol=1e-4)
        with pytest.raises(InferenceServerException, match="send 1 to 2 rows"):
            infer(client, pixels(0, batch=3))


def tome_serve(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tome_deploy.cli.serve", *args], stderr=subprocess.PIPE, text=True, **kwargs
    )


def test_cli_serves_and_stops_cleanly_on_sigterm(exported, session):
    process = tome_serve(str(exported.path), "--port", "0", "--name", MODEL, "--log-level", "error")
    try:
        line = process.stderr.readline()
        assert line.startswith(f"serving {MODEL} (test_vit"), line
        url = line.rsplit("http://", 1)[1].strip()
        process.stderr.readline()
        client = triton_http.InferenceServerClient(url)
        wait_for(client.is_server_ready)
        np.testing.assert_allclose(infer(client, pixels(3)), direct(session, pixels(3)), rtol=1e-5, atol=1e-5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        assert "all in-flight requests answered" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def os_thread_names(pid: int) -> list[str]:
    tasks = Path(f"/proc/{pid}/task")
    return sorted((task / "comm").read_text().strip() for task in tasks.iterdir())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads OS thread names from /proc")
def test_cli_server_threads_carry_os_names_for_model_and_decoding(exported, session):
    """top -H, perf and the serve_vs_triton benchmark tell the model's CPU from the front end's by these names."""
    process = tome_serve(str(exported.path), "--port", "0", "--name", MODEL, "--log-level", "error", "--threads", "1")
    try:
        url = process.stderr.readline().rsplit("http://", 1)[1].strip()
        client = triton_http.InferenceServerClient(url)
        wait_for(client.is_server_ready)
        np.testing.assert_allclose(
            infer(client, pixels(4), binary=False), direct(session, pixels(4)), rtol=1e-5, atol=1e-5
        )
        names = os_thread_names(process.pid)
        assert "tome-infer_0" in names and "tome-decode_0" in names, names
    finally:
        process.kill()
        process.wait()


def test_serves_an_export_whose_weights_are_in_an_external_data_file(
    external_data_export, release_export, tmp_path, capsys
):
    """The layout of every export over 2 GiB (test_vit.onnx + test_vit.onnx.data) serves the single file's
    logits; the graph without its data file is refused in one line that says what is missing."""
    path = external_data_export.export.path
    served_model = read_served_model(path)
    assert served_model.data_files == (path.with_name("test_vit.onnx.data"),)
    single = ort.InferenceSession(str(release_export("test_vit", 4, "scatter").export.path))
    with serving(served_model, OnnxRuntimeRunner(path), policy=BatchPolicy(max_batch=4, max_delay_s=0.01)) as served:
        x = pixels(11, batch=3)
        np.testing.assert_allclose(infer(served.client(), x), direct(single, x), rtol=1e-5, atol=1e-5)
    alone = tmp_path / "test_vit.onnx"
    alone.write_bytes(path.read_bytes())
    assert serve_cli.main([str(alone), "--port", "0"]) == 2
    assert_one_line_error(
        capsys.readouterr().err, "test_vit.onnx.data, which is missing", "put test_vit.onnx.data back"
    )


@pytest.mark.parametrize(
    "args, code, fragments",
    [
        (["missing.onnx", "--port", "0"], 2, ["no such artifact"]),
        (["{onnx}", "--port", "0", "--device", "cuda"], 2, ["CUDAExecutionProvider", "not active"]),
        (["{plan}", "--port", "0"], 2, ["has no sidecar", "tome-build"]),
        (["{onnx}", "--port", "{busy}"], 2, ["cannot listen", "another --port"]),
        (["{onnx}", "--port", "0", "--max-batch", "0"], 2, ["must be >= 1"]),
    ],
    ids=["missing", "cuda", "engine", "busy-port", "max-batch"],
)
def test_cli_errors_are_one_line(exported, tmp_path, capsys, args, code, fragments):
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"not an engine")
    busy = bind_socket("127.0.0.1", 0)
    try:
        values = {"onnx": str(exported.path), "plan": str(plan), "busy": str(busy.getsockname()[1])}
        assert serve_cli.main([a.format(**values) for a in args]) == code
    finally:
        busy.close()
    assert_one_line_error(capsys.readouterr().err, *fragments)


WITHOUT_SERVE_EXTRA = """
import importlib.abc, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("starlette", "uvicorn", "prometheus_client"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, Blocked())
from tome_deploy.cli import deploy, serve
for main, argv in ((serve.main, ["--help"]), (deploy.main, ["triton-repo", "--help"])):
    try:
        main(argv)
    except SystemExit as done:
        assert done.code == 0
sys.exit(serve.main([sys.argv[1], "--port", "0"]))
"""


def test_help_works_and_serving_says_what_to_install_without_the_serve_extra(exported):
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_SERVE_EXTRA, str(exported.path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 4, result.stderr
    assert "usage: tome-serve" in result.stdout and "usage: tome-deploy triton-repo" in result.stdout
    assert_one_line_error(result.stderr, "needs starlette", "pip install 'tome-deploy[serve]'")
