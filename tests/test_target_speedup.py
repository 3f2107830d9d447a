"""--target-speedup: the smallest constant r that reaches a FLOPs speedup, checked against a plain computation."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from tome_deploy.cli import export as export_cli
from tome_deploy.core.speedup import schedule_for_speedup, search_measured_r
from tome_deploy.errors import ScheduleError


def plain_flops(tokens: list[int], dim: int, mlp_ratio: float = 4.0) -> float:
    """FACTS counting rule: attention 8NC^2 + 4N^2C at a block's input tokens, MLP 4mNC^2 (16NC^2 at the
    usual m = 4) at its output tokens."""
    return sum(8 * tokens[i] * dim**2 + 4 * tokens[i] ** 2 * dim + 4 * mlp_ratio * tokens[i + 1] * dim**2
               for i in range(len(tokens) - 1))


def plain_tokens(r: int, num_tokens: int, depth: int, prefix: int) -> list[int]:
    tokens = [num_tokens]
    for _ in range(depth):
        tokens.append(tokens[-1] - min(r, (tokens[-1] - prefix) // 2))
    return tokens


def plain_ratio(r: int, num_tokens: int, depth: int, prefix: int, dim: int, mlp_ratio: float = 4.0) -> float:
    return (plain_flops([num_tokens] * (depth + 1), dim, mlp_ratio)
            / plain_flops(plain_tokens(r, num_tokens, depth, prefix), dim, mlp_ratio))


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


# test_vit cut to 2 blocks at 64 px: 4x4 patches + class token, width 64, MLP 3x. Each export of the measured
# search takes a third of test_vit's (6 blocks), and the largest useful r is (17 - 1) // 2 = 8, so the search
# measures at most 4 schedules (test_vit: up to 8, between r=7 and 50).
TINY = (17, 2, 1, 64)
TINY_MLP = 3.0


@pytest.fixture(scope="module")
def tiny_vit_file(tmp_path_factory):
    """The tiny test_vit as a torch.save()d module, a source tome-export takes like a timm name."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("test_vit", depth=2, img_size=64).eval()
    assert model.patch_embed.num_patches + model.num_prefix_tokens == TINY[0] and model.embed_dim == TINY[3]
    path = tmp_path_factory.mktemp("tiny") / "tiny_vit.pt"
    torch.save(model, path)
    return path


def test_cli_searches_measured_speedup_from_the_flops_choice(capsys, tmp_path, tiny_vit_file):
    """Real exports timed in ONNX Runtime; timings are noise here, so only the structure is asserted,
    never a time: either a measured r reaches the target (exit 0; it is the smallest measured r that does)
    or the error names the best measured ratio (exit 2, nothing written); a ratio below the target is
    never reported as reached."""
    report_path, out = tmp_path / "report.json", tmp_path / "m.onnx"
    code = export_cli.main([str(tiny_vit_file), "-o", str(out), "--target-speedup", "1.3", "--report", str(report_path)])
    err = capsys.readouterr().err
    ratios = [plain_ratio(k, *TINY, mlp_ratio=TINY_MLP) for k in range(TINY[0] // 2 + 1)]
    r = next(k for k, ratio in enumerate(ratios) if ratio >= 1.3)  # the smallest r whose FLOPs reach 1.3x
    r_last = (TINY[0] - TINY[2]) // 2
    assert r < r_last  # the search has somewhere to go
    assert f"target 1.30x -> r={r}, predicted {ratios[r]:.2f}x (FLOPs)" in err
    assert "measuring from there in ONNX Runtime (batch 1)" in err  # the runtime and batch of the target
    measured = {int(k): float(v) for k, v in re.findall(r"  r=(\d+): measured (\d+\.\d+)x", err)}
    tried = re.findall(r"  r=(\d+): measured", err)
    assert tried[0] == str(r)  # the search starts at the FLOPs choice
    assert len(tried) == len(measured) <= 4 and all(r <= k <= r_last for k in measured)  # none twice, none outside
    if code == 2:
        line = one_error_line(err)
        assert "no schedule reaches a measured 1.30x in ONNX Runtime at batch 1" in line
        best = re.search(r"the best is r=(\d+) at (\d+\.\d+)x", line)
        assert best, line
        assert int(best[1]) in measured and float(best[2]) == measured[int(best[1])] == max(measured.values())
        assert r_last in measured and all(ratio <= 1.3 for ratio in measured.values())  # all fell short, even r=8
        assert "not reached in ONNX Runtime" in err
        assert not out.exists() and not report_path.exists()
        return
    assert code == 0, err
    report = json.loads(report_path.read_text())
    search = report["measured_search"]
    chosen = search["r"]
    by_r = {int(k): v for k, v in search["measured"].items()}
    assert search["reached"] is True and r <= chosen <= r_last and set(by_r) == set(measured)
    assert by_r[chosen] >= 1.3  # never a slowdown reported as success
    assert all(ratio <= 1.3 for k, ratio in by_r.items() if k < chosen)  # the smallest measured r that reaches it
    assert report["measured_speedup"] == pytest.approx(by_r[chosen], abs=1e-3)
    tokens = plain_tokens(chosen, *TINY[:3])
    assert report["metadata"]["r_effective"] == [a - b for a, b in itertools.pairwise(tokens)]
    assert report["metadata"]["tokens_per_layer"] == tokens
    assert report["validation"]["passed"] is True and report["runtime"] == "onnxruntime"
    assert out.is_file() and report["onnx"] == str(out)


def fake_measure(table: dict[int, float], calls: list[int]):
    def measure(r: int) -> float:
        calls.append(r)
        return table[r]

    return measure


def test_search_stops_at_the_flops_choice_when_it_is_fast_enough():
    calls: list[int] = []
    choice = search_measured_r(1.5, 10, 40, fake_measure({10: 1.6}, calls))
    assert (choice.r, choice.reached, calls) == (10, True, [10])


def test_search_finds_the_smallest_measured_r_that_reaches_the_target():
    table = {r: 1.0 + 0.02 * r for r in range(10, 41)}  # reaches 1.5 first at r=25
    calls: list[int] = []
    choice = search_measured_r(1.5, 10, 40, fake_measure(table, calls))
    assert choice.reached and choice.r == 25
    assert len(calls) <= 2 + 5  # first, last, then bisection over 30 values
    assert len(set(calls)) == len(calls)  # nothing measured twice
    assert choice.measured == {r: table[r] for r in calls}


def test_search_says_when_no_r_reaches_the_target():
    table = {10: 0.9, 40: 1.2}
    choice = search_measured_r(1.3, 10, 40, fake_measure(table, []))
    assert not choice.reached and choice.r == 40 and choice.speedup == 1.2
    line = choice.line("ONNX Runtime")
    assert "not reached" in line and "r=40 at 1.20x" in line
    best_first = search_measured_r(1.3, 10, 40, fake_measure({10: 1.25, 40: 1.1}, []))
    assert best_first.r == 10 and not best_first.reached  # the best measured, even if it is not the last
