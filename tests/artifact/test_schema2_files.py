"""Schema-2 files, written by tome-deploy before an input had a kind, keep reading, validating and serving.

tests/data/schema2_hf_vit/ is a `save_pretrained` ViTForImageClassification (tests/family_sources.py's
TINY_HF_VIT, seeded weights, seed 1: 3 blocks, 8 x 8 patches of 4 px and the class token, 10 labels) with a
preprocessor_config.json (ImageNet mean / std, bicubic). The two files next to it were written from it by
tome-export at commit deed26f (schema 2), both printing PASS:

    tome-export tests/data/schema2_hf_vit --r 4 --merge scatter -o schema2_hf_vit_r4_scatter.onnx
    tome-export tests/data/schema2_hf_vit --r 4 --merge matmul --static-batch --batch-size 2 \\
        -o schema2_hf_vit_r4_matmul_b2.onnx

then the exporter's per-node debug annotations (node doc strings and metadata_props: stack traces with local
paths) were dropped to keep them small; the graph, its weights and the model's metadata_props are as written.
The real-tritonserver check of the scatter file is in tests/serving/test_triton_server.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tritonclient.http as triton_http
from conftest import assert_one_line_error

from tome_deploy.artifact.input_spec import image_spec
from tome_deploy.artifact.onnx_file import read_metadata
from tome_deploy.cli import validate as validate_cli
from tome_deploy.serving.served_model import read_served_model

DATA = Path(__file__).parents[1] / "data"
FOLDER = DATA / "schema2_hf_vit"
SCATTER = DATA / "schema2_hf_vit_r4_scatter.onnx"
STATIC = DATA / "schema2_hf_vit_r4_matmul_b2.onnx"
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
FLAT_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "input_name")


def props_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("path, batch", [(SCATTER, None), (STATIC, 2)], ids=["scatter", "static-batch"])
def test_a_schema_2_file_reads_as_an_image_input_spec(path, batch):
    props = props_of(path)
    assert props["tome.schema_version"] == "2" and "tome.input" not in props
    assert json.loads(props["tome.input_size"]) == [3, 32, 32]
    meta = read_metadata(path)
    assert meta.input == image_spec("pixel_values", [3, 32, 32], *IMAGENET, "bicubic", 1.0)
    assert meta.batch == batch and meta.r_effective == [4, 4, 4] and meta.tokens_per_layer == [65, 61, 57, 53]
    written = meta.to_props()  # written again, it is schema 3: one tome.input key, no flat image keys
    assert written["tome.schema_version"] == "3" and json.loads(written["tome.input"])["shape"] == [3, 32, 32]
    assert not any(f"tome.{key}" in written for key in FLAT_KEYS)


@pytest.mark.parametrize("path, checks", [(SCATTER, 6), (STATIC, 3)], ids=["scatter", "static-batch"])
def test_tome_validate_passes_on_a_schema_2_file(path, checks, capsys):
    assert validate_cli.main([str(FOLDER), str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["validation"]["passed"] and len(report["validation"]["checks"]) == checks
    assert {c["probe"] for c in report["validation"]["checks"]} == {"random", "constant", "natural"}


def test_a_damaged_schema_2_image_key_is_one_line_naming_it(tmp_path, capsys):
    model = onnx.load(str(SCATTER))
    for prop in model.metadata_props:
        if prop.key == "tome.mean":
            prop.value = "[0.5, 0.5]"
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    assert validate_cli.main([str(FOLDER), str(damaged)]) == 2
    assert_one_line_error(capsys.readouterr().err, "tome.mean must have 3 entries", "re-export with tome-export")


def test_tome_serve_serves_a_schema_2_file_as_onnx_runtime_runs_it():
    served = read_served_model(STATIC)
    assert served.fixed_batch == 2 and served.model_input.shape == (2, 3, 32, 32)
    process = subprocess.Popen(
        [sys.executable, "-m", "tome_deploy.cli.serve", str(SCATTER), "--port", "0", "--name", "old"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stderr.readline()
        url = line.rsplit("http://", 1)[1].strip()
        client = triton_http.InferenceServerClient(url, network_timeout=60)
        deadline = time.monotonic() + 60
        while not client.is_server_ready():
            assert time.monotonic() < deadline, "tome-serve never became ready"
            time.sleep(0.05)
        x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
        tensor = triton_http.InferInput("pixel_values", [3, 3, 32, 32], "FP32")
        tensor.set_data_from_numpy(x)
        got = client.infer("old", [tensor]).as_numpy("logits")
        session = ort.InferenceSession(str(SCATTER), providers=["CPUExecutionProvider"])
        np.testing.assert_allclose(got, session.run(None, {"pixel_values": x})[0], rtol=1e-5, atol=1e-5)
        metadata = client.get_model_metadata("old")["tome"]
        assert metadata["input"]["shape"] == [3, 32, 32] and metadata["mean"] == IMAGENET[0]
        wrong_rank = triton_http.InferInput("pixel_values", [3, 32, 32], "FP32")
        wrong_rank.set_data_from_numpy(x[0])
        with pytest.raises(Exception, match=r"has shape \[3, 32, 32\]; the model takes \[batch, 3, 32, 32\]"):
            client.infer("old", [wrong_rank])
    finally:
        process.terminate()
        process.wait(30)
