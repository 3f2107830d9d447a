"""Serving reads the input spec: `/infer` takes [batch, *spec.shape] under the spec's name, whatever the kind,
and refuses another rank or shape with a 400 naming the axes; `/classify` is for image inputs only; the Triton
repository's dims are the spec's shape.

The video and audio artifacts here are stand-in graphs, not ToMe models: logits [N, 10] = flatten(x) @ W, with a
video or audio input spec in otherwise ordinary tome-deploy metadata. Serving reads only the metadata's input
spec and batch and the graph's tensors, so this checks what serving does with each kind; the real video and
audio exports are served by the tests of their families."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from input_specs import audio_input, video_input
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from serve_process import post_json, tome_serve

from tome_deploy.artifact.input_spec import AXES
from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.errors import InvalidInputError
from tome_deploy.serving.images import image_to_input
from tome_deploy.serving.kserve import parse_infer_request
from tome_deploy.serving.served_model import read_served_model
from tome_deploy.serving.triton_repo import TritonOptions, model_config

RELEASE_ONNX = Path(__file__).parents[1] / "data" / "release_0.1.0_test_vit_r4_scatter.onnx"
VIDEO = video_input(4, 8)
AUDIO = audio_input(48, 16)
KINDS = {"video": VIDEO, "audio": AUDIO}


def standin_artifact(path: Path, spec: dict) -> Path:
    """An ONNX file: logits [batch, 10] = flatten(input [batch, *shape]) @ W (seeded), with the 0.1.0 release's
    metadata (read, so upgraded to this schema) and `spec` as its input."""
    size = math.prod(spec["shape"])
    weight = (np.random.default_rng(0).standard_normal((size, 10)) / np.sqrt(size)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [spec["name"]], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weight"], ["logits"]),
        ],
        "standin",
        [helper.make_tensor_value_info(spec["name"], TensorProto.FLOAT, ["batch", *spec["shape"]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    release = {p.key: p.value for p in onnx.load(str(RELEASE_ONNX)).metadata_props}
    props = ToMeMetadata.from_props(release, "release").to_props()
    for key, value in {**props, "tome.input": json.dumps(spec)}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module", params=sorted(KINDS))
def artifact(request, tmp_path_factory) -> tuple[Path, dict]:
    spec = KINDS[request.param]
    return standin_artifact(tmp_path_factory.mktemp("standin") / f"{request.param}.onnx", spec), spec


def infer_body(name: str, shape: list[int]) -> bytes:
    data = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    return json.dumps(
        {"inputs": [{"name": name, "shape": shape, "datatype": "FP32", "data": data.ravel().tolist()}]}
    ).encode()


def test_the_served_input_is_the_spec_with_its_axes_named(artifact):
    path, spec = artifact
    served = read_served_model(path)
    assert served.metadata.input.kind == spec["kind"] and served.model_input.name == spec["name"]
    assert served.model_input.shape == (-1, *spec["shape"]) and served.model_input.axes == AXES[spec["kind"]]


def test_infer_takes_the_spec_shape_and_refuses_another_rank_or_length_naming_the_axes(artifact):
    path, spec = artifact
    served = read_served_model(path)
    request = parse_infer_request(infer_body(spec["name"], [2, *spec["shape"]]), None, served.inputs, served.outputs, 8)
    assert request.inputs[spec["name"]].shape == (2, *spec["shape"])
    axes = ", ".join(("batch", *AXES[spec["kind"]]))
    wrong_rank = [2, *spec["shape"][1:]]
    wrong_length = [2, spec["shape"][0] * 2, *spec["shape"][1:]]
    for shape in (wrong_rank, wrong_length):
        with pytest.raises(InvalidInputError) as caught:
            parse_infer_request(infer_body(spec["name"], shape), None, served.inputs, served.outputs, 8)
        wanted = ", ".join(map(str, spec["shape"]))
        assert (
            str(caught.value) == f"input {spec['name']!r} has shape {shape}; the model takes [batch, {wanted}] ({axes})"
        )


def png() -> bytes:
    stream = io.BytesIO()
    Image.new("RGB", (20, 20), (120, 30, 200)).save(stream, format="PNG")
    return stream.getvalue()


def test_classify_refuses_an_input_that_is_not_an_image(artifact):
    path, spec = artifact
    with pytest.raises(InvalidInputError) as caught:
        image_to_input(png(), read_served_model(path).metadata, 10_000_000)
    kind = {"video": "a video", "audio_spectrogram": "an audio spectrogram"}[spec["kind"]]
    assert f"/classify takes an image, but this model takes {kind} input {spec['shape']}" in str(caught.value)
    assert "to /infer" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("backend", ["platform", "python"])
def test_the_triton_dims_are_the_spec_shape(artifact, backend):
    path, spec = artifact
    config = model_config(read_served_model(path), TritonOptions("m", backend=backend))
    assert config["input"] == [{"name": spec["name"], "data_type": "TYPE_FP32", "dims": spec["shape"]}]
    parameters = {p["key"]: p["value"]["string_value"] for p in config["parameters"]}
    assert json.loads(parameters["tome.input"]) == spec


def test_tome_serve_answers_a_video_clip_as_onnx_runtime_and_refuses_a_frame_or_an_image(tmp_path):
    path = standin_artifact(tmp_path / "video.onnx", VIDEO)
    with tome_serve(path, "clip") as url:
        status, answer = post_json(url, "/v2/models/clip/infer", infer_body("pixel_values", [3, 4, 3, 8, 8]))
        clip = np.random.default_rng(1).standard_normal((3, 4, 3, 8, 8)).astype(np.float32)
        expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": clip})
        assert status == 200 and answer["outputs"][0]["shape"] == [3, 10]
        np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (3, 10)), expected[0], rtol=1e-5, atol=1e-5)
        status, answer = post_json(url, "/v2/models/clip/infer", infer_body("pixel_values", [3, 3, 8, 8]))
        assert status == 400 and "the model takes [batch, 4, 3, 8, 8] (batch, frames," in answer["error"]
        status, answer = post_json(url, "/v2/models/clip/classify", png())
        assert status == 400 and "/classify takes an image, but this model takes a video input" in answer["error"]
