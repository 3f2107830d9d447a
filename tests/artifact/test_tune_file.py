"""tune.json as tome-export --schedule-from reads it, and the quality record (`tome.quality`) it puts in
the artifact: typed, bounded, optional, refused with one line when damaged."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from tome_deploy.artifact.metadata import MetadataError, ToMeMetadata
from tome_deploy.artifact.sidecar import EngineSidecar
from tome_deploy.artifact.tune_file import MAX_TUNE_BYTES, TuneFileError, read_tune_file
from tome_deploy.errors import InvalidInputError

DATA = Path(__file__).parents[1] / "data"
RELEASE_ONNX = DATA / "release_0.1.0_test_vit_r4_scatter.onnx"
RELEASE_SIDECAR = DATA / "release_0.1.0_test_vit_r4_matmul.plan.json"
FINGERPRINT = "ab" * 32
QUALITY = {
    "metric": "accuracy_drop",
    "value": 0.4,
    "count": 899,
    "data_fingerprint": FINGERPRINT,
    "metrics": {"top1_agreement": 0.98, "accuracy": 0.95, "accuracy_drop": 0.4},
}


DROP = object()  # tune_values(key=DROP) leaves the key out


def tune_values(**changes) -> dict:
    """A tune.json as tome-tune writes it, for a 6-block model; `a__b=value` sets values["a"]["b"]."""
    chosen = {
        "label": "r=3",
        "kind": "constant",
        "r_per_layer": [3, 3, 3, 3, 3, 3],
        "theoretical_speedup": 1.31,
        "measured_speedup": 1.12,
        "held_out": {"top1_agreement": 0.98, "accuracy": 0.95, "accuracy_drop": 0.4},
        "held_out_interval": {"top1_agreement": [0.97, 0.99]},
        "calibration": {"top1_agreement": 0.99},
        "within_budget": True,
    }
    values = {
        "tool_version": "0.1.0",
        "model": "tome_digits_vit",
        "weights_sha256": "cd" * 32,
        "runtime": "onnxruntime",
        "batch_size": 8,
        "output_kind": "logits",
        "data": {"fingerprint": FINGERPRINT, "images": 1797, "unreadable": 0, "labels": True},
        "split_seed": 0,
        "held_out_fraction": 0.5,
        "calibration_count": 898,
        "held_out_count": 899,
        "held_out_files": ["0/000.png"],
        "metric": "accuracy_drop",
        "budget": {"max_drop": 1.0, "min_agreement": None, "min_cosine": None, "target_speedup": None},
        "chosen": chosen,
        "candidates": [chosen],
    }
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        target = values
        for parent in parents:
            target = target[parent]
        if value is DROP:
            del target[key]
        else:
            target[key] = value
    return values


def write_tune(path: Path, **changes) -> Path:
    path.write_text(json.dumps(tune_values(**changes)))
    return path


def test_reads_the_chosen_schedule_weights_and_quality(tmp_path):
    tuned = read_tune_file(write_tune(tmp_path / "tune.json"))
    assert tuned.r_per_layer == [3, 3, 3, 3, 3, 3]
    assert tuned.weights_sha256 == "cd" * 32
    assert tuned.quality == QUALITY
    assert tuned.source == str((tmp_path / "tune.json").resolve())


def test_check_model_refuses_other_weights_and_another_depth(tmp_path):
    tuned = read_tune_file(write_tune(tmp_path / "tune.json"))
    tuned.check_model("cd" * 32, 6, "tome_digits_vit")
    with pytest.raises(TuneFileError, match=r"tuned for other weights .*re-run tome-tune for these weights"):
        tuned.check_model("ef" * 32, 6, "tome_digits_vit")
    with pytest.raises(TuneFileError, match=r"chosen.r_per_layer has 6 entries but tome_digits_vit has 12 blocks"):
        tuned.check_model("cd" * 32, 12, "tome_digits_vit")


DAMAGED_TUNE = [
    ({"chosen__r_per_layer": DROP}, "chosen.r_per_layer is missing"),
    ({"chosen": DROP}, "chosen.r_per_layer is missing"),
    ({"chosen__r_per_layer": [3, -1, 3, 3, 3, 3]}, "chosen.r_per_layer entry 1 must be a whole number from 0"),
    ({"chosen__r_per_layer": [3, 2.5, 3, 3, 3, 3]}, "chosen.r_per_layer entry 1 must be a whole number"),
    ({"chosen__r_per_layer": []}, "chosen.r_per_layer must have 1 to 1024 entries"),
    ({"chosen__r_per_layer": "3"}, "chosen.r_per_layer must be a list"),
    ({"weights_sha256": 7}, "weights_sha256 must be a non-empty string"),
    ({"weights_sha256": DROP}, "weights_sha256 is missing"),
    ({"metric": ["accuracy"]}, "metric must be 1 to 64 ASCII letters"),
    ({"metric": "top5_agreement"}, "chosen.held_out has no entry for the metric 'top5_agreement'"),
    ({"chosen__held_out": [0.4]}, "chosen.held_out must be a JSON object"),
    ({"chosen__held_out": {"accuracy_drop": "0.4"}}, "chosen.held_out entry 'accuracy_drop' must be a number"),
    ({"chosen__held_out": {"accuracy_drop": float("nan")}}, "chosen.held_out entry 'accuracy_drop' must be a number"),
    ({"held_out_count": 0}, "held_out_count must be a whole number from 1"),
    ({"held_out_count": True}, "held_out_count must be a whole number"),
    ({"data__fingerprint": None}, "data.fingerprint must be 1 to 128 ASCII letters"),
    ({"data": "x"}, "data.fingerprint is missing"),
]


@pytest.mark.parametrize("changes, fragment", DAMAGED_TUNE, ids=[f for _, f in DAMAGED_TUNE])
def test_a_damaged_tune_file_is_refused_with_one_line(tmp_path, changes, fragment):
    path = write_tune(tmp_path / "tune.json", **changes)
    with pytest.raises(TuneFileError) as caught:
        read_tune_file(path)
    message = str(caught.value)
    assert isinstance(caught.value, InvalidInputError) and "\n" not in message
    assert (
        message.startswith(f"{path.resolve()}: ")
        and fragment in message
        and message.endswith("re-run tome-tune to write it again")
    )


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b'{"chosen": ', "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
    ],
)
def test_a_file_that_is_not_a_tune_result_is_refused(tmp_path, content, fragment):
    path = tmp_path / "tune.json"
    path.write_bytes(content)
    with pytest.raises(TuneFileError, match=fragment):
        read_tune_file(path)


def test_a_missing_folder_or_oversized_file_is_refused_before_parsing(tmp_path):
    with pytest.raises(TuneFileError, match="no such file: .*nope.json"):
        read_tune_file(tmp_path / "nope.json")
    with pytest.raises(TuneFileError, match="is not a file"):
        read_tune_file(tmp_path)
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (MAX_TUNE_BYTES + 1))  # valid JSON would follow; the size alone refuses it
    with pytest.raises(TuneFileError, match=f"has {MAX_TUNE_BYTES + 1} bytes"):
        read_tune_file(big)


def release_metadata() -> ToMeMetadata:
    props = {p.key: p.value for p in onnx.load(str(RELEASE_ONNX)).metadata_props}
    meta = ToMeMetadata.from_props(props, "release.onnx")
    assert meta is not None
    return meta


def test_metadata_round_trips_with_and_without_quality():
    plain = release_metadata()
    assert plain.quality is None and "tome.quality" not in plain.to_props() and "quality" not in plain.to_dict()
    assert ToMeMetadata.from_props(plain.to_props(), "x.onnx") == plain
    tuned = ToMeMetadata(**{**vars(plain), "quality": QUALITY})
    props = tuned.to_props()
    assert props["tome.schema_version"] == "3"
    assert json.loads(props["tome.quality"]) == QUALITY
    back = ToMeMetadata.from_props(props, "x.onnx")
    assert back == tuned and back.quality == QUALITY


def test_an_engine_sidecar_keeps_the_quality_of_its_onnx_file():
    sidecar = EngineSidecar.from_dict(json.loads(RELEASE_SIDECAR.read_text()), "release.plan.json")
    assert sidecar.tome is not None and sidecar.tome.quality is None
    tuned = EngineSidecar(**{**vars(sidecar), "tome": ToMeMetadata(**{**vars(sidecar.tome), "quality": QUALITY})})
    written = json.loads(tuned.to_json())
    assert written["tome"]["quality"] == QUALITY and "quality" not in json.loads(sidecar.to_json())["tome"]
    back = EngineSidecar.from_dict(written, "model.plan.json")
    assert back.tome is not None and back.tome.quality == QUALITY


def test_a_quality_record_with_keys_it_does_not_know_reads_without_them():
    props = {**release_metadata().to_props(), "tome.quality": json.dumps({**QUALITY, "interval": [0.1, 0.7]})}
    meta = ToMeMetadata.from_props(props, "x.onnx")
    assert meta is not None and meta.quality == QUALITY


DAMAGED_QUALITY = [
    ('"good"', "tome.quality must be a JSON object"),
    (json.dumps({k: v for k, v in QUALITY.items() if k != "count"}), "tome.quality has no 'count'"),
    (json.dumps({**QUALITY, "count": -3}), "tome.quality 'count' must be a whole number from 1"),
    (json.dumps({**QUALITY, "value": "0.4"}), "tome.quality 'value' must be a number"),
    (json.dumps({**QUALITY, "value": 1e300}), "tome.quality 'value' must be a number"),
    (json.dumps({**QUALITY, "value": 0.5}), "tome.quality 'value' must be the 'accuracy_drop' entry of 'metrics'"),
    (json.dumps({**QUALITY, "metric": ""}), "tome.quality 'metric' must be 1 to 64 ASCII letters"),
    (json.dumps({**QUALITY, "metric": "a b"}), "tome.quality 'metric' must be 1 to 64 ASCII letters"),
    (json.dumps({**QUALITY, "data_fingerprint": "f" * 129}), "tome.quality 'data_fingerprint' must be 1 to 128"),
    (json.dumps({**QUALITY, "metrics": {"accuracy_drop": 0.4, "x": None}}), "tome.quality 'metrics' entry 'x'"),
    (
        json.dumps({**QUALITY, "metrics": {f"m{i}": 0.4 for i in range(65)}}),
        "tome.quality 'metrics' must have at most 64 entries",
    ),
    ('{"metric": NaN}', "tome.quality has no 'value'"),
]


@pytest.mark.parametrize("raw, fragment", DAMAGED_QUALITY, ids=[f for _, f in DAMAGED_QUALITY])
def test_a_damaged_quality_record_is_refused_on_read(raw, fragment):
    props = {**release_metadata().to_props(), "tome.quality": raw}
    with pytest.raises(MetadataError) as caught:
        ToMeMetadata.from_props(props, "model.onnx")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("model.onnx: ") and fragment in message
    assert message.endswith("re-export with tome-export")
