"""--target-speedup: the smallest constant r that reaches a FLOPs speedup, checked against a plain computation."""

from __future__ import annotations

import json

import pytest

from tome_deploy.cli import export as export_cli
from tome_deploy.core.speedup import schedule_for_speedup
from tome_deploy.errors import ScheduleError


def plain_flops(tokens: list[int], dim: int) -> int:
    """FACTS counting rule: attention 8NC^2 + 4N^2C at a block's input tokens, MLP 16NC^2 at its output tokens."""
    return sum(8 * tokens[i] * dim**2 + 4 * tokens[i] ** 2 * dim + 16 * tokens[i + 1] * dim**2
               for i in range(len(tokens) - 1))


def plain_tokens(r: int, num_tokens: int, depth: int, prefix: int) -> list[int]:
    tokens = [num_tokens]
    for _ in range(depth):
        tokens.append(tokens[-1] - min(r, (tokens[-1] - prefix) // 2))
    return tokens


def plain_ratio(r: int, num_tokens: int, depth: int, prefix: int, dim: int) -> float:
    return plain_flops([num_tokens] * (depth + 1), dim) / plain_flops(plain_tokens(r, num_tokens, depth, prefix), dim)


# (tokens at input, depth, prefix, dim): ViT-S/16, ViT-B/16 at 224, test_vit (10x10 patches + class, 6 blocks, 64).
SHAPES = {"vit_s": (197, 12, 1, 384), "vit_b": (197, 12, 1, 768), "test_vit": (101, 6, 1, 64)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("target", [1.0, 1.1, 1.3, 1.5, 2.0, 2.5, 3.0, 4.0])
def test_chosen_r_is_the_smallest_reaching_the_target(shape, target):
    num_tokens, depth, prefix, dim = SHAPES[shape]
    r, predicted = schedule_for_speedup(num_tokens, depth, prefix, dim, target)
    ratios = [plain_ratio(k, num_tokens, depth, prefix, dim) for k in range(r + 1)]
    assert predicted >= target
    assert predicted == pytest.approx(ratios[r], rel=1e-12)
    assert all(ratio < target for ratio in ratios[:r])  # no smaller r reaches it


def test_paper_anchors():
    """r=16 on ViT-S/16 is the ~2x configuration of the ToMe paper."""
    assert schedule_for_speedup(197, 12, 1, 384, 2.0) == (16, pytest.approx(2.0338, abs=1e-4))
    assert schedule_for_speedup(197, 12, 1, 768, 2.0)[0] == 16


def test_unreachable_target_names_the_best_ratio():
    best = plain_ratio(98, 197, 12, 1, 768)  # r = (197 - 1) // 2 merges as much as any schedule can
    with pytest.raises(ScheduleError, match=f"gives {best:.2f}x") as caught:
        schedule_for_speedup(197, 12, 1, 768, 50.0)
    assert "50.00x" in str(caught.value) and "ask for at most" in str(caught.value)
    assert schedule_for_speedup(197, 12, 1, 768, best - 1e-9)[0] <= 98  # the ceiling itself is reachable


def test_strict_only_picks_unclamped_schedules():
    r, predicted = schedule_for_speedup(197, 12, 1, 384, 1.8, strict=True)
    assert plain_tokens(r, 197, 12, 1) == [197 - r * i for i in range(13)]  # no layer clamped
    with pytest.raises(ScheduleError, match="--r-inflect"):
        schedule_for_speedup(197, 12, 1, 384, 2.0, strict=True)  # r=16 clamps the last layer


@pytest.mark.parametrize("target", [0.5, float("nan"), float("inf"), True])
def test_bad_targets(target):
    with pytest.raises(ScheduleError):
        schedule_for_speedup(197, 12, 1, 384, target)


def one_error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_refuses_unreachable_targets_and_conflicting_flags(capsys, tmp_path):
    out = str(tmp_path / "m.onnx")
    assert export_cli.main(["test_vit", "-o", out, "--target-speedup", "50"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "50.00x" in line and "ask for at most" in line
    assert export_cli.main(["test_vit", "-o", out, "--target-speedup", "2", "--r", "8"]) == 2
    assert "--r" in one_error_line(capsys.readouterr().err)
    with pytest.raises(SystemExit) as caught:  # argparse: mutually exclusive with the other schedule flags
        export_cli.main(["test_vit", "-o", out, "--target-speedup", "2", "--r-inflect", "-1"])
    assert caught.value.code == 2
    capsys.readouterr()
    assert not (tmp_path / "m.onnx").exists()


def test_cli_exports_at_the_chosen_r_and_prints_predicted_and_measured(capsys, tmp_path):
    """One real export (plus the unmerged one it is timed against)."""
    report_path = tmp_path / "report.json"
    code = export_cli.main(["test_vit", "-o", str(tmp_path / "m.onnx"), "--target-speedup", "1.3",
                            "--report", str(report_path)])
    assert code == 0
    err = capsys.readouterr().err
    r, predicted = schedule_for_speedup(*SHAPES["test_vit"], 1.3, mlp_ratio=3.0)  # test_vit's MLP is 3x wide
    assert predicted >= 1.3
    assert f"target 1.30x -> r={r}, predicted {predicted:.2f}x (FLOPs)" in err
    report = json.loads(report_path.read_text())
    summary = [line for line in err.splitlines() if line.startswith("target 1.30x") and "measured" in line]
    assert len(summary) == 1 and f"measured {report['measured_speedup']:.2f}x" in summary[0]
    assert report["target_speedup"] == {"target": 1.3, "r": r, "predicted_flops": round(predicted, 4)}
    assert report["metadata"]["r_effective"] == [r] * 6
    assert report["metadata"]["theoretical_speedup"] == pytest.approx(predicted, abs=1e-4)
    assert report["validation"]["passed"] is True
