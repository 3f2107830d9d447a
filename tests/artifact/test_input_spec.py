"""The input spec an artifact records: each kind's shape and preprocessing read back typed and bounded."""

import pytest
from input_specs import audio_input

from tome_deploy.artifact.checks import FieldError
from tome_deploy.artifact.input_spec import InputSpec, image_spec

IMAGE = {
    "kind": "image",
    "name": "pixel_values",
    "shape": [3, 224, 224],
    "preprocessing": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "crop_pct": 0.9},
}
VIDEO = {
    "kind": "video",
    "name": "pixel_values",
    "shape": [16, 3, 224, 224],
    "preprocessing": {**IMAGE["preprocessing"], "sampling": "uniform"},
}
AUDIO = audio_input(1024, 128, mean=-4.2677393, std=4.5689974)


@pytest.mark.parametrize("values", [IMAGE, VIDEO, AUDIO], ids=["image", "video", "audio"])
def test_each_kind_reads_back_what_it_wrote(values):
    spec = InputSpec.from_dict(values)
    assert spec.to_dict() == values
    assert InputSpec.from_dict(spec.to_dict()) == spec


def test_named_axes():
    video = InputSpec.from_dict(VIDEO)
    assert (video.axis("frames"), video.image_size) == (16, (224, 224))
    assert InputSpec.from_dict(AUDIO).axis("mel") == 128
    with pytest.raises(ValueError, match="no image size"):
        _ = InputSpec.from_dict(AUDIO).image_size


def test_image_spec_builds_an_image_input():
    spec = image_spec("pixel_values", [3, 32, 48], [0.1] * 3, [0.2] * 3, "bilinear", 1.0)
    assert (spec.kind, spec.shape, spec.image_size) == ("image", (3, 32, 48), (32, 48))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kind": "speech"}, "'kind' must be one of image, video, audio_spectrogram"),
        ({"shape": [16, 3, 224]}, "'shape' must have 4 entries, got 3"),
        ({"shape": [100000, 3, 224, 224]}, "'shape' entry 0 (frames) must be a whole number from 1 to 512"),
        ({"shape": [512, 16, 2048, 2048]}, "holds more than"),
        ({"name": "a b"}, "'name' must be 1 to 128"),
        ({"preprocessing": {"mean": [0.5] * 3}}, "'preprocessing' has no 'std'"),
        ({"preprocessing": {**VIDEO["preprocessing"], "sampling": "random"}}, "'sampling' must be one of uniform"),
        ({"preprocessing": {**VIDEO["preprocessing"], "mean": [0.5]}}, "'mean' must have 3 entries, got 1"),
        ({"preprocessing": {**VIDEO["preprocessing"], "std": [0.5, -1, 0.5]}}, "entry 1 must be a number from 1e-06"),
        ({"preprocessing": []}, "'preprocessing' must be a JSON object, got list"),
    ],
)
def test_a_damaged_video_spec_names_the_field(change, message):
    with pytest.raises(FieldError) as caught:
        InputSpec.from_dict({**VIDEO, **change})
    assert message in str(caught.value)


def test_audio_settings_must_agree_with_the_shape():
    with pytest.raises(FieldError, match=r"'num_mel_bins' must equal the shape's mel axis \(128\), got 64"):
        InputSpec.from_dict({**AUDIO, "preprocessing": {**AUDIO["preprocessing"], "num_mel_bins": 64}})
    with pytest.raises(FieldError, match="'do_normalize' must be true or false"):
        InputSpec.from_dict({**AUDIO, "preprocessing": {**AUDIO["preprocessing"], "do_normalize": 1}})
