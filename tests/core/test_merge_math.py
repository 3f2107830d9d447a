"""bipartite_match / merge_sum / merge_weighted against the plain reference of the rules in docs/design.md."""

from __future__ import annotations

import itertools

import pytest
import torch
from reference_tome import reference_match, reference_merge

from tome_deploy.core.merge import (
    Match,
    bipartite_match,
    merge_sum,
    merge_weighted,
    permutation_from_rank,
    proportional_attention_bias,
    stable_descending_rank,
)

FORMULATIONS = ["scatter", "matmul"]


def _cases():
    """(N, p, r) with r in {1, a middle value, the maximum (N - p) // 2}, N odd and even."""
    cases = []
    for n, p in itertools.product([2, 3, 4, 7, 8, 17, 24, 31, 50], [0, 1, 2, 5]):
        r_max = (n - p) // 2
        if r_max < 1:
            continue
        for r in sorted({1, max(1, r_max // 2), r_max}):
            cases.append((n, p, r))
    return cases


CASES = _cases()


def _check_against_reference(metric: torch.Tensor, r: int, p: int) -> Match:
    """Compare the library's choice with the reference for every image of the batch; return the Match."""
    batch, n, _ = metric.shape
    match = bipartite_match(metric, r, p)
    assert match.kept.shape == (batch, n - r)
    assert match.source.shape == (batch, r)
    assert match.destination.shape == (batch, r)
    for b in range(batch):
        src_a, dst_b, order = reference_match(metric[b], r, p)
        assert match.kept[b].tolist() == order, f"output order differs for image {b}"
        got_pairs = dict(zip(match.source[b].tolist(), match.destination[b].tolist()))
        want_pairs = {2 * ia: 2 * jb + 1 for ia, jb in zip(src_a, dst_b)}
        assert got_pairs == want_pairs, f"merge pairs differ for image {b}"
    return match


def _check_merge_against_reference(metric, x, size, r, p, merged, merged_size) -> None:
    """merged [B, N - r, C] and merged_size [B, N - r, 1] against the reference merge of every image."""
    for b in range(x.shape[0]):
        src_a, dst_b, order = reference_match(metric[b], r, p)
        want_x, want_size = reference_merge(x[b], size[b, :, 0], src_a, dst_b, order)
        torch.testing.assert_close(merged[b].double(), want_x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(merged_size[b, :, 0].double(), want_size, rtol=0, atol=0)


@pytest.mark.parametrize("n,p,r", CASES)
def test_export_form_equals_reference_random(n, p, r):
    """The form exports for ONNX Runtime / OpenVINO take (TopK for the score order, the gather and
    ScatterND custom ops), run eagerly: the same choice as the reference and the same merge as
    the eager form. Random metrics have no ties, so torch's TopK order is the ONNX one here; ties run in
    ONNX Runtime in tests/onnx_export/test_onnx_export.py."""
    from tome_deploy.core.tracing import onnx_export_tracing

    gen = torch.Generator().manual_seed(7 * n + 3 * p + r)
    metric, x = torch.randn(3, n, 8, generator=gen), torch.randn(3, n, 5, generator=gen)
    size = torch.randint(1, 6, (3, n, 1), generator=gen).float()
    with onnx_export_tracing(topk_ties=True):
        match = _check_against_reference(metric, r, p)
        merged = {formulation: merge_weighted(x, size, match, formulation) for formulation in FORMULATIONS}
    for got_x, got_size in merged.values():
        _check_merge_against_reference(metric, x, size, r, p, got_x, got_size)


@pytest.mark.parametrize("n,p,r", CASES)
def test_match_equals_reference_random(n, p, r):
    gen = torch.Generator().manual_seed(1000 * n + 10 * p + r)
    metric = torch.randn(3, n, 8, generator=gen)
    match = _check_against_reference(metric, r, p)
    # Prefix tokens: never a source or a destination, first in the output in their original order.
    assert (match.source >= p).all() and (match.destination >= p).all()
    assert match.kept[:, :p].tolist() == [list(range(p))] * 3
    # Sources are A (even) positions, destinations B (odd) positions; sources are distinct and not kept.
    assert (match.source % 2 == 0).all() and (match.destination % 2 == 1).all()
    for b in range(3):
        src = set(match.source[b].tolist())
        kept = match.kept[b].tolist()
        assert len(src) == r and len(set(kept)) == n - r
        assert src.isdisjoint(kept) and src | set(kept) == set(range(n))


def _tie_metrics(n: int, seed: int) -> dict[str, torch.Tensor]:
    """Metrics whose cosine similarities are exact in fp32, so ties are real ties in every precision."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 2, (3, 16), generator=gen).float() * 2 - 1  # 3 distinct +-1 vectors (norm 4)
    choice = torch.randint(0, 3, (2, n), generator=gen)
    repeated = torch.randn(1, 1, 8, generator=gen).expand(2, n, 8).contiguous()
    return {
        "constant": torch.ones(2, n, 16),
        "three_patterns": patterns[choice],  # many identical tokens, exact +-1/16 sums
        "repeated_random": repeated,  # one arbitrary vector everywhere
    }


@pytest.mark.parametrize("n,p,r", [c for c in CASES if c[0] in (7, 8, 17, 24, 31)])
def test_match_tie_stress(n, p, r):
    for name, metric in _tie_metrics(n, seed=n * 7 + p).items():
        try:
            _check_against_reference(metric, r, p)
        except AssertionError as error:
            raise AssertionError(f"{name} metric, N={n} p={p} r={r}: {error}") from None


@pytest.mark.parametrize("p", [0, 1, 2, 3])
def test_constant_metric_hand_computed(p):
    """All tokens identical: every score ties. Written out by hand from the rules, not from the reference."""
    n, r = 11, 3
    match = bipartite_match(torch.ones(1, n, 4), r, p)
    a_positions = list(range(0, n, 2))  # 0 2 4 6 8 10
    b_positions = list(range(1, n, 2))  # 1 3 5 7 9
    first_free_b = next(pos for pos in b_positions if pos >= p)  # ties -> lowest unprotected B index
    free_a = [pos for pos in a_positions if pos >= p]  # protected rows are -inf, so they sort last
    sources = free_a[:r]  # stable sort: ties -> lower A index
    unmerged_a = [pos for pos in a_positions if pos not in sources]  # ascending (also score order here)
    expected_kept = list(range(p)) + [pos for pos in unmerged_a if pos >= p] + [pos for pos in b_positions if pos >= p]
    assert sorted(match.source[0].tolist()) == sources
    assert match.destination[0].tolist() == [first_free_b] * r
    assert match.kept[0].tolist() == expected_kept


def test_no_prefix_keeps_unmerged_a_in_score_order():
    """p = 0: unmerged A tokens stay in score order (reference behaviour), not in index order."""
    # A tokens (even positions) with decreasing-then-increasing similarity to the only useful B token.
    angles = torch.tensor([0.9, 0.0, 0.1, 0.0, 0.5, 0.0, 0.3, 0.0])  # A at 0,2,4,6; B all along angle 0
    metric = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)[None]  # [1, 8, 2]
    match = bipartite_match(metric, 1, 0)
    # scores (cos of angle): A0 0.62, A1(pos2) 0.995, A2(pos4) 0.878, A3(pos6) 0.955 -> order pos 2, 6, 4, 0
    assert match.source[0].tolist() == [2]
    assert match.kept[0].tolist() == [6, 4, 0, 1, 3, 5, 7]
    # With one prefix token the unmerged ones go back to ascending A index.
    match = bipartite_match(metric, 1, 1)
    assert match.source[0].tolist() == [2]
    assert match.kept[0].tolist() == [0, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize("p", [1, 2, 3, 5])
def test_prefix_tokens_never_merge_even_when_most_similar(p):
    """Prefix tokens are copies of patch tokens (perfect similarity) and still must not merge."""
    n = 21
    gen = torch.Generator().manual_seed(p)
    metric = torch.randn(2, n, 6, generator=gen)
    metric[:, :p] = metric[:, p : 2 * p]  # each prefix token equals a patch token exactly
    for r in range(1, (n - p) // 2 + 1):
        match = _check_against_reference(metric, r, p)
        assert (match.source >= p).all() and (match.destination >= p).all()
        assert match.kept[:, :p].tolist() == [list(range(p))] * 2


def test_fp16_metric_upcast():
    """Sum of squares of a large fp16 metric overflows fp16; matching must still follow the rules."""
    gen = torch.Generator().manual_seed(5)
    metric = (torch.randn(2, 17, 32, generator=gen) * 200).half()
    assert torch.isinf((metric * metric).sum(-1)).any()  # the trap is real
    _check_against_reference(metric, 6, 1)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("n,p,r", [(17, 1, 4), (18, 2, 8), (31, 5, 13), (24, 0, 12), (9, 0, 1)])
def test_merge_weighted_equals_reference(formulation, n, p, r):
    gen = torch.Generator().manual_seed(n + p + r)
    metric = torch.randn(2, n, 8, generator=gen)
    x = torch.randn(2, n, 5, generator=gen)
    size = torch.randint(1, 6, (2, n, 1), generator=gen).float()
    match = bipartite_match(metric, r, p)
    merged, merged_size = merge_weighted(x, size, match, formulation)
    assert merged.shape == (2, n - r, 5) and merged_size.shape == (2, n - r, 1)
    assert merged.dtype == x.dtype
    _check_merge_against_reference(metric, x, size, r, p, merged, merged_size)
    # Total size is preserved.
    torch.testing.assert_close(merged_size.sum(dim=1), size.sum(dim=1), rtol=0, atol=0)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_merge_with_unit_sizes_sums_to_n(formulation):
    n, p, r = 33, 1, 16
    metric = torch.ones(2, n, 4)  # every source goes to the same destination: maximal duplicates
    match = bipartite_match(metric, r, p)
    x = torch.randn(2, n, 3)
    merged, size = merge_weighted(x, torch.ones(2, n, 1), match, formulation)
    assert size.sum(dim=1).tolist() == [[float(n)]] * 2
    # p=1 protects only position 0, so every source goes to position 1 (lowest B index), which keeps
    # the mean of itself and its 16 sources.
    assert match.destination.tolist() == [[1] * r] * 2
    dst_slot = match.kept[0].tolist().index(1)
    expected = (x[:, 1] + x[:, match.source[0]].sum(dim=1)) / (r + 1)
    torch.testing.assert_close(merged[:, dst_slot], expected)
    assert size[0, dst_slot, 0].item() == r + 1


@pytest.mark.parametrize("n,p,r", [(17, 1, 8), (26, 2, 7), (31, 0, 15), (50, 5, 22)])
def test_scatter_and_matmul_agree(n, p, r):
    gen = torch.Generator().manual_seed(n)
    for metric in (torch.randn(2, n, 8, generator=gen), torch.ones(2, n, 8)):
        match = bipartite_match(metric, r, p)
        x = torch.randn(2, n, 12, generator=gen)
        size = torch.randint(1, 4, (2, n, 1), generator=gen).float()
        torch.testing.assert_close(merge_sum(x, match, "scatter"), merge_sum(x, match, "matmul"), rtol=1e-6, atol=1e-6)
        xs, ss = merge_weighted(x, size, match, "scatter")
        xm, sm = merge_weighted(x, size, match, "matmul")
        torch.testing.assert_close(xs, xm, rtol=1e-6, atol=1e-6)
        assert torch.equal(ss, sm)


def test_merge_sum_tracks_sources():
    """merge_sum on an identity matrix gives the membership matrix of the merged tokens."""
    n, p, r = 15, 1, 7
    metric = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(3))
    match = bipartite_match(metric, r, p)
    for formulation in FORMULATIONS:
        source = merge_sum(torch.eye(n)[None], match, formulation)  # [1, n - r, n]
        src_a, dst_b, order = reference_match(metric[0], r, p)
        expected = torch.zeros(n - r, n)
        for slot, pos in enumerate(order):
            expected[slot, pos] = 1
            for ia, jb in zip(src_a, dst_b):
                if 2 * jb + 1 == pos:
                    expected[slot, 2 * ia] = 1
        assert torch.equal(source[0], expected)
        assert torch.equal(source.sum(dim=1), torch.ones(1, n))  # every input token in exactly one output


def test_stable_descending_rank_and_permutation():
    gen = torch.Generator().manual_seed(11)
    score = torch.randint(0, 4, (3, 13), generator=gen).float()  # lots of ties
    score[0, 5] = float("-inf")
    score[1, :] = float("-inf")  # all tied at -inf
    rank = stable_descending_rank(score)
    order = permutation_from_rank(rank)
    for b in range(3):
        values = score[b].tolist()
        want = sorted(range(13), key=lambda i: -values[i])  # stable: ties -> lower index
        assert order[b].tolist() == want
        assert [rank[b, i].item() for i in want] == list(range(13))


def test_proportional_attention_bias():
    size = torch.tensor([[1.0, 2.0, 4.0]])[..., None]  # [1, 3, 1]
    bias = proportional_attention_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias[0, 0, 0], torch.tensor([0.0, 0.6931471805599453, 1.3862943611198906]))


@pytest.mark.parametrize("scale", [None, 0.3])
def test_attention_is_the_same_fused_and_as_exported(scale):
    """core.attention: SDPA eagerly and MatMul/Softmax while exporting, both equal to the written-out math."""
    from tome_deploy.core.attention import scaled_attention
    from tome_deploy.core.tracing import onnx_export_tracing

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    size = torch.tensor([[1.0, 2, 1, 3, 1, 1, 4], [2.0, 1, 1, 1, 5, 1, 1]])  # [B, M]
    bias = size.log()[:, None, None, :]  # [B, 1, 1, M]
    s = 8**-0.5 if scale is None else scale
    logits = (q.double() @ k.double().transpose(-2, -1)) * s + bias.double()
    expected = torch.softmax(logits, dim=-1) @ v.double()
    fused = scaled_attention(q, k, v, bias, scale)
    with onnx_export_tracing():
        explicit = scaled_attention(q, k, v, bias, scale)
    unfused = scaled_attention(q, k, v, bias, scale, fused=False)
    for out in (fused, explicit, unfused):
        assert torch.allclose(out.double(), expected, atol=1e-5)
    assert torch.equal(explicit, unfused)
