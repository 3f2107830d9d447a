"""A real `tome-serve` process for tests, and the JSON requests they send it."""

from __future__ import annotations

import contextlib
import http.client
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np


def post_json(url: str, path: str, body: bytes | dict) -> tuple[int, dict]:
    """POST a JSON body (bytes, or a dict to encode) to host:port `url`; (status, decoded answer)."""
    host, port = url.split(":")
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def infer_body(name: str, x: np.ndarray) -> bytes:
    """A KServe v2 /infer request with one FP32 input `name` holding `x` (JSON data, any rank)."""
    tensor = {"name": name, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


@contextlib.contextmanager
def tome_serve(artifact: Path, model_name: str) -> Iterator[str]:
    """`tome-serve ARTIFACT --port 0 --name MODEL_NAME` started and ready; yields its host:port, stops it after."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tome_deploy.cli.serve", str(artifact), "--port", "0", "--name", model_name],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stderr.readline().rsplit("http://", 1)[1].strip()
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert time.monotonic() < deadline, "tome-serve never became ready"
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def _ready(url: str) -> bool:
    host, port = url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        connection.request("GET", "/v2/health/ready")
        return connection.getresponse().status == 200
    except ConnectionError:
        return False
    finally:
        connection.close()
