"""paired_outputs on recording runners (batching, fixed-batch padding, unreadable files), the output kind and
the headline metric."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tome_deploy.errors import InvalidInputError
from tome_deploy.quality.data import DataConfig, read_image_folder
from tome_deploy.quality.report import headline_metric, output_kind, paired_outputs
from tome_deploy.runtime.base import Runner

CONFIG = DataConfig(input_size=[3, 2, 2], mean=[0.0] * 3, std=[1.0] * 3, interpolation="nearest", crop_pct=1.0)


class Recorder(Runner):
    """Returns each image's top-left value times `scale` as a [B, 2] output; records the batch sizes fed."""

    name = "recorder"

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale, self.batches = scale, []

    def _load(self) -> None:
        pass

    def _run(self, feed):
        x = feed["x"]
        self.batches.append(len(x))
        value = x[:, 0, 0, 0] * self.scale
        return {"y": np.stack([value, -value], axis=1)}

    def _release(self) -> None:
        pass


@pytest.mark.parametrize("fixed, fed", [(False, [2, 1]), (True, [2, 2])])
def test_batches_padding_and_unreadable_files(tmp_path, fixed, fed):
    for name, value in [("a.png", 51), ("b.png", 102), ("d.png", 255)]:
        Image.fromarray(np.full((2, 2), value, np.uint8), mode="L").save(tmp_path / name)
    (tmp_path / "c.png").write_bytes(b"broken")
    images = read_image_folder(tmp_path)
    with Recorder(1.0) as reference, Recorder(2.0) as candidate:
        expected, got, decoded = paired_outputs(
            reference,
            candidate,
            images,
            [0, 1, 2, 3],
            CONFIG,
            input_name="x",
            output_name="y",
            batch_size=2,
            fixed_batch=fixed,
        )
    # batches (a, b) and (c, d); c does not decode, so the second batch is d alone (padded to 2 when fixed)
    assert decoded == [0, 1, 3] and reference.batches == fed and candidate.batches == fed
    assert expected[:, 0] == pytest.approx([0.2, 0.4, 1.0]) and got[:, 0] == pytest.approx([0.4, 0.8, 2.0])


def test_nothing_decoded_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(b"broken")
    images = read_image_folder(tmp_path)
    with Recorder(1.0) as reference, Recorder(1.0) as candidate, pytest.raises(InvalidInputError, match="decoded"):
        paired_outputs(
            reference, candidate, images, [0], CONFIG, input_name="x", output_name="y", batch_size=1, fixed_batch=False
        )


def test_output_kind():
    assert output_kind("logits", [5, 10], None) == "logits"
    assert output_kind("logits", [5, 10], "cosine_mean") == "embedding"
    assert output_kind("logits", [5, 1], None) == "embedding"
    assert output_kind("embeds", [5, 10], None) == "embedding"
    with pytest.raises(InvalidInputError, match="--metric accuracy needs classification logits"):
        output_kind("embeds", [5, 10], "accuracy")


def test_headline_metric():
    assert headline_metric("logits", True, None) == "accuracy_drop"
    assert headline_metric("logits", False, None) == "top1_agreement"
    assert headline_metric("embedding", False, None) == "cosine_mean"
    assert headline_metric("logits", False, "mean_kl") == "mean_kl"
    with pytest.raises(InvalidInputError, match="needs labelled images"):
        headline_metric("logits", False, "accuracy_drop")
