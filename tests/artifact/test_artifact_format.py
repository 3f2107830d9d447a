"""The artifact format (tome_deploy/artifact): typed ToMe metadata and engine sidecars, their schema versions,
files of the 0.1.0 release, and damaged or newer files refused with one typed line.

tests/data/release_0.1.0_test_vit_r4_scatter.onnx was written by the 0.1.0 release (commit 8a3ba33:
`tome-export test_vit --r 4 --merge scatter --no-validate`), then its initializers and nodes were
stripped to keep it small; its metadata_props and graph inputs/outputs are as the release wrote them.
tests/data/release_0.1.0_test_vit_r4_matmul.plan.json is the sidecar the same release's `tome-build`
wrote for `--target tensorrt` (TensorRT-RTX, SM89), unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from conftest import assert_one_line_error
from input_specs import audio_input, video_input

from tome_deploy.artifact.checks import NewerSchemaError
from tome_deploy.artifact.metadata import SCHEMA_VERSION, MetadataError, ToMeMetadata
from tome_deploy.artifact.onnx_file import read_metadata
from tome_deploy.artifact.sidecar import (
    SIDECAR_SCHEMA_VERSION,
    EngineMismatchError,
    EngineSidecar,
    SidecarError,
    file_sha256,
    read_sidecar,
    sidecar_path,
)
from tome_deploy.cli import deploy as deploy_cli
from tome_deploy.errors import InvalidInputError
from tome_deploy.serving.served_model import read_served_model

DATA = Path(__file__).parents[1] / "data"
RELEASE_ONNX = DATA / "release_0.1.0_test_vit_r4_scatter.onnx"
RELEASE_SIDECAR = DATA / "release_0.1.0_test_vit_r4_matmul.plan.json"


def release_props() -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(RELEASE_ONNX)).metadata_props}


def write_onnx_with_props(path: Path, props: dict[str, str]) -> Path:
    """The release file with its metadata_props replaced by `props`."""
    model = onnx.load(str(RELEASE_ONNX))
    del model.metadata_props[:]
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path.write_bytes(model.SerializeToString())
    return path


def test_the_release_file_reads_as_typed_values():
    meta = read_metadata(RELEASE_ONNX)
    assert "tome.schema_version" not in release_props()  # version 1: the release wrote no version key
    assert release_props()["tome.batch"] == '"dynamic"' and release_props()["tome.extra"] == '{"example_batch": 1}'
    assert meta.batch is None and meta.example_batch == 1
    assert meta.tool_version == "0.1.0" and meta.model == "test_vit" and meta.merge == "scatter"
    assert (meta.input.kind, meta.input.name, meta.input.shape) == ("image", "pixel_values", (3, 160, 160))
    assert meta.input.preprocessing == {
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bicubic",
        "crop_pct": 0.95,
    }
    assert meta.schedule == 4 and meta.r_effective == [4] * 6 and meta.depth == 6
    assert meta.tokens_per_layer == [101, 97, 93, 89, 85, 81, 77] and meta.num_prefix_tokens == 1
    assert (meta.precision, meta.target, meta.opset) == ("fp32", "onnxruntime", 18)


def test_round_trip_writes_the_current_schema():
    meta = read_metadata(RELEASE_ONNX)
    props = meta.to_props()
    assert props["tome.schema_version"] == str(SCHEMA_VERSION) == "3"
    assert props["tome.batch"] == "null" and props["tome.example_batch"] == "1" and "tome.extra" not in props
    assert json.loads(props["tome.input"]) == {
        "kind": "image",
        "name": "pixel_values",
        "shape": [3, 160, 160],
        "preprocessing": {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.95},
    }
    flat = ("input_size", "mean", "std", "interpolation", "crop_pct", "input_name")
    assert not any(f"tome.{key}" in props for key in flat)
    assert ToMeMetadata.from_props(props, "x.onnx") == meta
    static = ToMeMetadata(**{**vars(meta), "batch": 4, "example_batch": 4})
    assert json.loads(static.to_props()["tome.batch"]) == 4
    assert ToMeMetadata.from_props(static.to_props(), "x.onnx").batch == 4


def test_a_fixed_batch_of_the_release_format_becomes_an_int():
    props = {**release_props(), "tome.batch": '"8"', "tome.extra": '{"example_batch": 8}'}
    meta = ToMeMetadata.from_props(props, "x.onnx")
    assert meta.batch == 8 and meta.example_batch == 8


def test_the_example_batch_has_one_default():
    props = ToMeMetadata.from_props(release_props(), "x.onnx").to_props()
    del props["tome.example_batch"], props["tome.batch"]
    meta = ToMeMetadata.from_props(props, "x.onnx")
    assert meta.example_batch == 1 and meta.batch is None


def test_props_without_tome_keys_are_not_an_export():
    assert ToMeMetadata.from_props({"other.key": "1"}, "x.onnx") is None


def test_exports_write_schema_version_3(export_cached):
    exported = export_cached("vit_class_token")
    props = {p.key: p.value for p in onnx.load(str(exported.path), load_external_data=False).metadata_props}
    assert json.loads(props["tome.input"])["shape"] == [3, 160, 160] and "tome.input_size" not in props
    assert props["tome.schema_version"] == "3" and props["tome.batch"] == "null" and props["tome.example_batch"] == "2"
    assert read_metadata(exported.path) == exported.metadata


def test_a_newer_schema_is_refused_naming_the_file_and_the_fix(tmp_path):
    path = write_onnx_with_props(tmp_path / "future.onnx", {**release_props(), "tome.schema_version": "4"})
    with pytest.raises(NewerSchemaError) as caught:
        read_metadata(path)
    message = str(caught.value)
    assert isinstance(caught.value, InvalidInputError) and "\n" not in message
    assert str(path) in message and "schema version 4" in message and "upgrade tome-deploy" in message


DAMAGED = [
    ("tome.input_size", "[3, 160", "tome.input_size is not valid JSON"),
    ("tome.input_size", '"abc"', "tome.input_size must be a list"),
    ("tome.input_size", "[3, -160, 160]", "tome.input_size entry 1 must be a whole number from 1 to 2048"),
    ("tome.input_size", "[3, 100000, 100000]", "tome.input_size entry 1 must be a whole number"),
    ("tome.input_size", "[3, 160]", "tome.input_size must have 3 entries"),
    ("tome.input_size", "[64, 160, 160]", "tome.input_size has 64 channels"),
    ("tome.input_size", "[3, 160.5, 160]", "tome.input_size entry 1 must be a whole number"),
    ("tome.mean", "[0.5, 0.5]", "tome.mean must have 3 entries"),
    ("tome.std", "[0.5, 0, 0.5]", "tome.std entry 1 must be a number"),
    ("tome.std", "[0.5, NaN, 0.5]", "tome.std entry 1 must be a number"),
    ("tome.crop_pct", "0.0001", "tome.crop_pct must be a number"),
    ("tome.r_effective", "4", "tome.r_effective must be a list"),
    ("tome.r_effective", "[4, 4]", "tome.r_requested must have 2 entries"),
    ("tome.r_effective", "[4, 4, 4, 4, 4, 400]", "tome.r_effective and tome.tokens_per_layer disagree at block 5"),
    ("tome.tokens_per_layer", "[101, 97]", "tome.tokens_per_layer must have 7 entries"),
    ("tome.tokens_per_layer", "[101, 97, 93, 89, 85, 81, 70]", "disagree at block 5"),
    ("tome.r_requested", '{"a": 1}', "tome.r_requested must be a list"),
    ("tome.num_prefix_tokens", "true", "tome.num_prefix_tokens must be a whole number"),
    ("tome.merge", '"gather"', "tome.merge must be one of scatter, matmul, plugin"),
    ("tome.precision", '"fp8"', "tome.precision must be one of fp32, fp16"),
    ("tome.target", '"tpu"', "tome.target must be one of onnxruntime, tensorrt"),
    ("tome.interpolation", '"magic"', "tome.interpolation must be one of"),
    ("tome.opset", "18.5", "tome.opset must be a whole number"),
    ("tome.batch", '"many"', 'tome.batch must be "dynamic" or a whole number'),
    ("tome.batch", "0", "tome.batch must be a whole number from 1 to 4096"),
    ("tome.extra", '{"example_batch": 1000000}', "tome.example_batch must be a whole number from 1 to 4096"),
    ("tome.schedule", '"sixteen"', "tome.schedule must be a whole number"),
    ("tome.model", "7", "tome.model must be a non-empty string"),
    ("tome.schema_version", '"two"', "tome.schema_version must be a whole number"),
    ("tome.schema_version", "0", "tome.schema_version must be a whole number"),
]


@pytest.mark.parametrize("key, raw, fragment", DAMAGED, ids=[f"{k}={v}" for k, v, _ in DAMAGED])
def test_damaged_metadata_is_refused_with_one_line(key, raw, fragment):
    with pytest.raises(MetadataError) as caught:
        ToMeMetadata.from_props({**release_props(), key: raw}, "model.onnx")
    message = str(caught.value)
    assert isinstance(caught.value, InvalidInputError) and "\n" not in message
    assert message.startswith("model.onnx: ") and fragment in message and message.endswith("re-export with tome-export")


def test_a_missing_required_key_is_refused():
    props = release_props()
    del props["tome.r_effective"]
    with pytest.raises(
        MetadataError, match=r"^model\.onnx: tome\.r_effective is missing .*re-export with tome-export$"
    ):
        ToMeMetadata.from_props(props, "model.onnx")


def test_damaged_metadata_in_a_file_is_one_cli_line(tmp_path, capsys):
    path = write_onnx_with_props(tmp_path / "crafted.onnx", {**release_props(), "tome.input_size": '"abc"'})
    assert deploy_cli.main(["triton-repo", str(path), str(tmp_path / "repo")]) == 2
    assert_one_line_error(
        capsys.readouterr().err, str(path), "tome.input_size must be a list", "re-export with tome-export"
    )
    assert not (tmp_path / "repo").exists()


def test_serving_reads_the_release_file_and_refuses_metadata_that_disagrees_with_the_graph(tmp_path):
    served_model = read_served_model(RELEASE_ONNX)
    assert served_model.metadata.batch is None and served_model.fixed_batch is None and served_model.num_classes == 1000
    lying = write_onnx_with_props(tmp_path / "lying.onnx", {**release_props(), "tome.input_size": "[3, 2048, 2048]"})
    with pytest.raises(
        MetadataError,
        match=r"tome.input says pixel_values \[3, 2048, 2048\] \(channels, height, width\) but the model's input is "
        r"pixel_values \[3, 160, 160\]",
    ):
        read_served_model(lying)


def test_metadata_carries_no_local_path(tmp_path):
    """The loader's description of a checkpoint, which export_model records as tome.weights, names the file only."""
    from conftest import make_model
    from safetensors.torch import save_file

    from tome_deploy.models.loading.dispatch import load_model
    from tome_deploy.models.patch import apply_tome
    from tome_deploy.onnx_export.metadata import build_metadata

    checkpoint = tmp_path / "private_folder" / "weights.safetensors"
    checkpoint.parent.mkdir()
    save_file(make_model("test_vit", {}).state_dict(), str(checkpoint))
    loaded = load_model("test_vit", checkpoint=str(checkpoint))
    tome, schedule = apply_tome(loaded.model, 4)
    meta = build_metadata(
        tome,
        schedule,
        4,
        arch="test_vit",
        weights=loaded.weights,
        weights_sha256="x",
        merge="scatter",
        opset=18,
        batch=None,
        example_batch=1,
    )
    assert meta.weights == "checkpoint weights.safetensors"
    assert not any(str(tmp_path) in value or "private_folder" in value for value in meta.to_props().values())


# --- engine sidecars ---


def release_sidecar() -> dict:
    return json.loads(RELEASE_SIDECAR.read_text())


def test_the_release_sidecar_reads_as_typed_values():
    sidecar = EngineSidecar.from_dict(release_sidecar(), str(RELEASE_SIDECAR))
    assert release_sidecar()["format"] == 1 and "schema_version" not in release_sidecar()
    assert isinstance(sidecar.tome, ToMeMetadata) and sidecar.tome.batch is None and sidecar.tome.example_batch == 1
    assert sidecar.tome.merge == "matmul" and sidecar.tome.target == "tensorrt" and sidecar.tome.r_effective == [4] * 6
    assert sidecar.profiles[0].max == 32 and sidecar.input_shape == [3, 160, 160] and sidecar.output_shape == [1000]
    assert "test_vit, r per layer [4, 4, 4, 4, 4, 4], merge=matmul" in sidecar.summary()


def test_a_sidecar_of_a_video_engine_reads_its_input_shape_and_checks_it_against_the_metadata():
    tome = {**ToMeMetadata.from_props(current_props(), "x").to_dict(), "input": VIDEO_INPUT}
    record = {**release_sidecar(), "input_shape": [16, 3, 32, 32], "tome": tome}
    sidecar = EngineSidecar.from_dict(record, "x.plan.json")
    assert sidecar.input_shape == [16, 3, 32, 32] and sidecar.tome.input.kind == "video"
    sidecar.tome.check_input(sidecar.input_name, sidecar.input_shape, "x.plan")


def test_sidecar_round_trip_writes_both_schema_versions():
    sidecar = EngineSidecar.from_dict(release_sidecar(), "x.plan.json")
    written = json.loads(sidecar.to_json())
    assert written["schema_version"] == SIDECAR_SCHEMA_VERSION == 2 and "format" not in written
    assert written["tome"]["schema_version"] == SCHEMA_VERSION and written["tome"]["batch"] is None
    assert EngineSidecar.from_dict(written, "x.plan.json") == sidecar


def write_engine(folder: Path, record: dict | str) -> Path:
    """A stand-in engine file and a sidecar whose size and checksum match it (only the sidecar is under test)."""
    plan = folder / "model.plan"
    plan.write_bytes(b"not a real engine, only its checksum matters here")
    if isinstance(record, dict):
        record = json.dumps({**record, "plan_bytes": plan.stat().st_size, "plan_sha256": file_sha256(plan)})
    sidecar_path(plan).write_text(record)
    return plan


def test_a_matching_sidecar_is_read(tmp_path):
    assert read_sidecar(write_engine(tmp_path, release_sidecar())).tome.model == "test_vit"


def change(record: dict, path: str, value) -> dict:
    """A copy of `record` with the key at dotted `path` set to `value` (None as value: the key removed)."""
    record = json.loads(json.dumps(record))
    *parents, last = path.split(".")
    target = record
    for key in parents:
        target = target[key]
    if value is None:
        del target[last]
    else:
        target[last] = value
    return record


DAMAGED_SIDECARS = [
    ("profiles", [], "'profiles' must hold at least one optimization profile"),
    ("profiles", [{"input_name": "x", "min": 8, "opt": 4, "max": 2}], "'profiles' entry 0 must have min <= opt <= max"),
    (
        "profiles",
        [{"input_name": "x", "min": 1, "opt": 4, "max": 10**9}],
        "'profiles' entry 0 must be {input_name, min, opt, max}",
    ),
    ("input_shape", "abc", "'input_shape' must be a list"),
    ("input_shape", [3, 160, 1 << 20], "'input_shape' entry 2 must be a whole number"),
    ("input_shape", [1, 2, 3, 4, 5], "'input_shape' must have 1 to 4 entries"),
    ("input_shape", [16384, 16384], "holds more than 67108864 numbers in one sample"),
    ("backend", "tensorflow", "'backend' must be one of tensorrt, tensorrt-rtx"),
    ("backend", None, "'backend' is missing"),
    ("compute_capabilities", ["sm_89"], "'compute_capabilities' entry 0 must be a compute capability"),
    ("tome", [1, 2], "'tome' must be a JSON object or null"),
    ("tome.input_size", "abc", "tome.input_size must be a list"),
    ("tome.r_effective", [4], "tome.r_requested must have 1 entries"),
]


@pytest.mark.parametrize("key, value, fragment", DAMAGED_SIDECARS, ids=[f"{k}={v!r}" for k, v, _ in DAMAGED_SIDECARS])
def test_a_damaged_sidecar_is_refused_with_one_line(tmp_path, key, value, fragment):
    plan = write_engine(tmp_path, change(release_sidecar(), key, value))
    with pytest.raises(SidecarError) as caught:
        read_sidecar(plan)
    message = str(caught.value)
    assert isinstance(caught.value, EngineMismatchError) and "\n" not in message
    assert message.startswith(f"{sidecar_path(plan)}: ") and fragment in message
    assert message.endswith("rebuild the engine with tome-build")


def test_a_sidecar_that_is_not_json_is_refused(tmp_path):
    plan = write_engine(tmp_path, '{"backend": "tensorrt-rtx",')
    with pytest.raises(
        SidecarError,
        match=r"model\.plan\.json is not a tome-build sidecar \(not JSON: .*rebuild the engine with tome-build$",
    ):
        read_sidecar(plan)


@pytest.mark.parametrize("key", ["schema_version", "tome.schema_version"])
def test_a_newer_sidecar_or_embedded_metadata_is_refused(tmp_path, key):
    plan = write_engine(tmp_path, change(release_sidecar(), key, 99))
    with pytest.raises(NewerSchemaError) as caught:
        read_sidecar(plan)
    message = str(caught.value)
    assert "\n" not in message and str(sidecar_path(plan)) in message
    assert "schema version 99" in message and "upgrade tome-deploy" in message


# --- schema 3: the input spec ---


def current_props() -> dict[str, str]:
    """The release file's metadata as this version writes it (schema 3)."""
    return read_metadata(RELEASE_ONNX).to_props()


VIDEO_INPUT = video_input(16, 32)
AUDIO_INPUT = audio_input(128, 64)


@pytest.mark.parametrize("spec", [VIDEO_INPUT, AUDIO_INPUT], ids=["video", "audio"])
def test_metadata_of_other_input_kinds_round_trips_and_checks_the_graph_input(spec):
    meta = ToMeMetadata.from_props({**current_props(), "tome.input": json.dumps(spec)}, "x.onnx")
    assert meta.input.kind == spec["kind"] and list(meta.input.shape) == spec["shape"]
    assert ToMeMetadata.from_props(meta.to_props(), "x.onnx") == meta
    meta.check_input(spec["name"], [*spec["shape"]], "x.onnx")
    shorter = [spec["shape"][0] // 2, *spec["shape"][1:]]
    with pytest.raises(MetadataError) as caught:
        meta.check_input(spec["name"], shorter, "x.onnx")
    message = str(caught.value)
    assert "\n" not in message and f"but the model's input is {spec['name']} {shorter}" in message
    assert f"tome.input says {spec['name']} {spec['shape']} (" in message and "re-export" in message


DAMAGED_INPUTS = [
    ({**VIDEO_INPUT, "kind": "sound"}, "tome.input 'kind' must be one of image, video, audio_spectrogram"),
    ({**VIDEO_INPUT, "shape": [3, 32, 32]}, "tome.input 'shape' must have 4 entries"),
    ({**VIDEO_INPUT, "shape": [100000, 3, 32, 32]}, "tome.input 'shape' entry 0 (frames) must be a whole number"),
    ({**AUDIO_INPUT, "preprocessing": {**AUDIO_INPUT["preprocessing"], "max_length": 64}}, "must equal the shape's"),
    ("[3, 32, 32]", "tome.input must be a JSON object"),
]


@pytest.mark.parametrize("value, fragment", DAMAGED_INPUTS, ids=["kind", "rank", "frames", "max-length", "list"])
def test_a_damaged_input_spec_is_refused_with_one_line(value, fragment):
    raw = value if isinstance(value, str) else json.dumps(value)
    with pytest.raises(MetadataError) as caught:
        ToMeMetadata.from_props({**current_props(), "tome.input": raw}, "model.onnx")
    message = str(caught.value)
    assert "\n" not in message and fragment in message and message.endswith("re-export with tome-export")


def test_a_schema_3_file_needs_its_input_spec_and_ignores_the_flat_image_keys():
    props = current_props()
    del props["tome.input"]
    with pytest.raises(MetadataError, match=r"tome\.input is missing"):
        ToMeMetadata.from_props({**props, "tome.input_size": "[3, 160, 160]"}, "model.onnx")
