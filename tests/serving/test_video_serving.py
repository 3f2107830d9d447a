"""`tome-serve` on a real ToMe video export (the session's VideoMAE `video_export`, clips [4, 3, 32, 32]): `/infer`
(KServe v2) answers as ONNX Runtime runs the file, and a clip of another frame count or rank is a 400 that names
the axes."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

import numpy as np
import onnxruntime as ort


def post(url: str, path: str, body: bytes) -> tuple[int, dict]:
    host, port = url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def infer_body(x: np.ndarray) -> bytes:
    tensor = {"name": "pixel_values", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def test_tome_serve_answers_a_clip_as_onnx_runtime_and_refuses_another_frame_count_or_rank(video_export):
    process = subprocess.Popen(
        [sys.executable, "-m", "tome_deploy.cli.serve", str(video_export.path), "--port", "0", "--name", "clip"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stderr.readline().rsplit("http://", 1)[1].strip()
        x = np.random.default_rng(2).standard_normal((3, 4, 3, 32, 32)).astype(np.float32)
        deadline = time.monotonic() + 60
        while True:
            try:
                status, answer = post(url, "/v2/models/clip/infer", infer_body(x))
                break
            except ConnectionError:
                assert time.monotonic() < deadline, "tome-serve never answered"
                time.sleep(0.05)
        session = ort.InferenceSession(str(video_export.path), providers=["CPUExecutionProvider"])
        expected = session.run(None, {"pixel_values": x})[0]
        assert status == 200 and answer["outputs"][0]["shape"] == [3, 5]
        np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (3, 5)), expected, rtol=1e-5, atol=1e-5)
        for wrong in (x[:, :2], x[:, 0]):  # 2 frames; one frame per clip (rank 4)
            status, answer = post(url, "/v2/models/clip/infer", infer_body(wrong))
            assert status == 400, answer
            assert "the model takes [batch, 4, 3, 32, 32] (batch, frames, channels, height, width)" in answer["error"]
    finally:
        process.terminate()
        process.wait(30)
