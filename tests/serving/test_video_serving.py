"""`tome-serve` on a real ToMe video export (the session's VideoMAE `video_export`, clips [4, 3, 32, 32]): `/infer`
(KServe v2) answers as ONNX Runtime runs the file, and a clip of another frame count or rank is a 400 that names
the axes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from serve_process import infer_body, post_json, tome_serve


def test_tome_serve_answers_a_clip_as_onnx_runtime_and_refuses_another_frame_count_or_rank(video_export):
    x = np.random.default_rng(2).standard_normal((3, 4, 3, 32, 32)).astype(np.float32)
    with tome_serve(video_export.path, "clip") as url:
        status, answer = post_json(url, "/v2/models/clip/infer", infer_body("pixel_values", x))
        session = ort.InferenceSession(str(video_export.path), providers=["CPUExecutionProvider"])
        expected = session.run(None, {"pixel_values": x})[0]
        assert status == 200 and answer["outputs"][0]["shape"] == [3, 5]
        np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (3, 5)), expected, rtol=1e-5, atol=1e-5)
        for wrong in (x[:, :2], x[:, 0]):  # 2 frames; one frame per clip (rank 4)
            status, answer = post_json(url, "/v2/models/clip/infer", infer_body("pixel_values", wrong))
            assert status == 400, answer
            assert "the model takes [batch, 4, 3, 32, 32] (batch, frames, channels, height, width)" in answer["error"]
