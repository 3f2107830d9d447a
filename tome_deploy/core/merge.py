"""Token Merging math: bipartite soft matching and size-weighted merging.

Pure tensor functions with static output shapes for a given (tokens, r, prefix count), so that the
same code runs eagerly, traces with torch.export and becomes a fixed-shape ONNX graph.

Shapes: B batch, N tokens, C channels, p prefix tokens (class, distillation, registers), which sit at
positions 0..p-1. Set A holds the even positions (Na = ceil(N/2) tokens), set B the odd ones
(Nb = floor(N/2))."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tome_deploy.artifact.spec import MergeFormulation
from tome_deploy.core.tracing import exporting_onnx, topk_orders_ties


class Match(NamedTuple):
    """Where tokens go, as indices into set A and set B; every shape depends only on (N, r).

    The output order is [prefix tokens, non-prefix unmerged A, non-prefix B] (`in_output_order`); `kept`,
    `source` and `destination` give the same match as token positions (the fused op's contract)."""

    source_a: torch.Tensor  # [B, r]      A indices merged away
    destination_b: torch.Tensor  # [B, r]      B index each source merges into
    unmerged_a: torch.Tensor  # [B, Na - r] A indices kept, prefix ones first
    num_tokens: int  # N
    num_prefix: int  # p

    @property
    def source(self) -> torch.Tensor:
        return 2 * self.source_a  # [B, r] positions

    @property
    def destination(self) -> torch.Tensor:
        return 2 * self.destination_b + 1  # [B, r] positions

    @property
    def kept(self) -> torch.Tensor:
        """[B, N - r] positions of the output tokens, in output order."""
        unmerged = 2 * self.unmerged_a  # [B, Na - r]
        # Constant positions broadcast over the batch by an add (a shape ONNX can infer, unlike an Expand
        # to a batch-sized shape tensor).
        zeros = unmerged.sum(dim=1, keepdim=True) * 0  # [B, 1], also when no A token stays unmerged
        b_positions = zeros + torch.arange(1, self.num_tokens, 2, device=unmerged.device)  # [B, Nb]
        return in_output_order(unmerged, b_positions, self.num_prefix)


def in_output_order(unmerged: torch.Tensor, b: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """unmerged: [B, Na - r, ...] unmerged A rows (prefix ones first), b: [B, Nb, ...] B rows ->
    [B, N - r, ...] ordered [prefix tokens in position order, non-prefix unmerged A, non-prefix B].

    With p <= 1 that is one Concat: the class token is the first unmerged A token. With more, the prefix
    tokens alternate between A (even positions) and B (odd), and one Gather by a constant permutation
    puts them back in position order.
    """
    tokens = torch.cat([unmerged, b], dim=1)  # [B, N - r, ...]
    if num_prefix <= 1:
        return tokens
    num_unmerged, num_b = unmerged.shape[1], b.shape[1]
    prefix_a, prefix_b = (num_prefix + 1) // 2, num_prefix // 2  # prefix tokens that fall in A and in B
    order = [k // 2 if k % 2 == 0 else num_unmerged + k // 2 for k in range(num_prefix)]
    order += list(range(prefix_a, num_unmerged)) + list(range(num_unmerged + prefix_b, num_unmerged + num_b))
    return tokens.index_select(1, torch.tensor(order, device=tokens.device))


def protected_mask(num_tokens: int, num_prefix: int) -> torch.Tensor:
    """[Na, Nb] bool, True where a score involves a prefix token (row in A or column in B)."""
    position_a = torch.arange(0, num_tokens, 2)  # [Na]
    position_b = torch.arange(1, num_tokens, 2)  # [Nb]
    return (position_a[:, None] < num_prefix) | (position_b[None, :] < num_prefix)


def bipartite_match(metric: torch.Tensor, r: int, num_prefix: int) -> Match:
    """Pick the r most similar (A, B) pairs, never touching the first num_prefix tokens.

    metric: [B, N, c] attention keys averaged over heads. r must already be clamped to
    (N - num_prefix) // 2 by the schedule, which guarantees every source is a non-prefix A token.
    """
    num_tokens = metric.shape[1]
    # Cosine similarity in fp32: the sum of squares overflows fp16.
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)  # [B, N, c]
    a, b = metric[:, 0::2], metric[:, 1::2]  # [B, Na, c], [B, Nb, c]
    scores = a @ b.transpose(-1, -2)  # [B, Na, Nb]
    # A constant mask and a scalar export as one plain Where (no ScatterElements, no Expand of -inf).
    mask = protected_mask(num_tokens, num_prefix).to(scores.device)  # [Na, Nb]
    scores = scores.masked_fill(mask, -torch.inf)

    best_score, best_b = scores.max(dim=-1)  # [B, Na], [B, Na]; ties -> lowest B index
    source_a, unmerged_a = split_by_score(best_score, r, num_prefix)  # [B, r], [B, Na - r]
    destination_b = best_b.gather(-1, source_a)  # [B, r]
    return Match(source_a, destination_b, unmerged_a, num_tokens, num_prefix)


def split_by_score(best_score: torch.Tensor, r: int, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """best_score: [B, Na] -> (source_a [B, r], unmerged_a [B, Na - r]) A indices.

    Sources are the r best scores in a stable descending order (ties -> lower index). With prefix
    tokens the unmerged go in ascending A index, which keeps the prefix tokens at the front; without,
    they stay in score order (the reference). Exported for ONNX Runtime / OpenVINO, whose TopK orders
    ties by the lower index (ONNX spec), this is one TopK over the scores and one over the unmerged
    indices; otherwise a counting rank (`stable_descending_rank`) and one TopK of distinct keys.
    """
    num_a = best_score.shape[-1]
    if topk_orders_ties():
        order = best_score.topk(num_a, dim=-1, largest=True, sorted=True).indices  # [B, Na]
        source_a, unmerged_a = order[:, :r], order[:, r:]
        if num_prefix > 0:
            unmerged_a = unmerged_a.topk(num_a - r, dim=-1, largest=False, sorted=True).values
        return source_a, unmerged_a
    rank = stable_descending_rank(best_score)  # [B, Na]
    if num_prefix > 0:
        # Unmerged keys r + index are distinct and above every source's rank 0..r-1 (two nodes, no CumSum).
        index_a = torch.arange(num_a, device=rank.device, dtype=rank.dtype)  # [Na]
        rank = torch.where(rank < r, rank, r + index_a)
    order = permutation_from_rank(rank)  # [B, Na]: sources in score order, then unmerged
    return order[:, :r], order[:, r:]


def stable_descending_rank(score: torch.Tensor) -> torch.Tensor:
    """score: [B, M] -> [B, M] float32 counts, each entry's position in a stable descending sort.

    Ties go to the lower index. Counting instead of sorting gives every runtime the same tie rule
    (ONNX has no stable sort; TensorRT documents no TopK tie order) for M^2 comparisons, tiny next
    to attention's N^2 C. Counts up to M are exact in float32.
    """
    m = score.shape[-1]
    index = torch.arange(m, device=score.device)
    earlier = index[None, :] < index[:, None]  # [M(i), M(j)]: j < i
    other, this = score[:, None, :], score[:, :, None]  # [B, 1, M(j)], [B, M(i), 1]
    ahead = (other > this) | ((other == this) & earlier)  # [B, M(i), M(j)]: j sorts before i
    return ahead.float().sum(dim=-1)


def permutation_from_rank(rank: torch.Tensor) -> torch.Tensor:
    """rank: [B, M] distinct sort keys (e.g. a permutation of 0..M-1) -> order [B, M], the indices by
    ascending key (for a permutation: rank[order[k]] == k).

    The keys are distinct, so an ascending TopK has no ties to break and is exact on every runtime.
    """
    return rank.float().topk(rank.shape[-1], dim=-1, largest=False, sorted=True).indices


def gather_tokens(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x: [B, N, C], positions: [B, K] int64 -> [B, K, C], whole rows per image.

    Whole rows (GatherND) are ~7x faster in ONNX Runtime than GatherElements, whose index would have to
    be expanded over C. While onnx_export traces (`core.tracing`), the rows come from the `gather_tokens_op` custom op,
    which tome-deploy's exporter writes as one GatherND(batch_dims=1) with static shapes; advanced
    indexing (what a plain torch.onnx.export gets) exports an Expand to a computed shape instead.
    """
    if exporting_onnx():
        return gather_tokens_op(x, positions)
    return x[torch.arange(x.shape[0], device=x.device)[:, None], positions]


@torch.library.custom_op("tome_deploy::gather_tokens", mutates_args=())
def gather_tokens_op(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """gather_tokens as one opaque op for torch.export: [B, N, C], [B, K] -> [B, K, C]."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], positions]


@gather_tokens_op.register_fake
def _gather_tokens_shape(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], positions.shape[1], *x.shape[2:]))


# The overload torch.export records and onnx_export translates.
GATHER_TOKENS_OVERLOAD = torch.ops.tome_deploy.gather_tokens.default


def _add_at_scatter(x: torch.Tensor, src: torch.Tensor, destination: torch.Tensor) -> torch.Tensor:
    """x: [B, M, C] with src [B, r, C] summed in at destination [B, r] (ScatterElements add)."""
    index = destination[..., None]  # [B, r, 1]
    if x.shape[-1] != 1:
        index = index.expand(-1, -1, x.shape[-1])  # [B, r, C]
    return x.scatter_add(1, index, src)


def _add_at_matmul(x: torch.Tensor, src: torch.Tensor, destination: torch.Tensor) -> torch.Tensor:
    """The same sum as a one-hot matmul: no scatter op, so every runtime (TensorRT-RTX too) takes it."""
    slots = torch.arange(x.shape[1], device=x.device)  # [M]
    onehot = (destination[..., None] == slots).to(src.dtype)  # [B, r, M]
    return x + onehot.transpose(1, 2) @ src  # [B, M, C]


def merge_sum(x: torch.Tensor, match: Match, formulation: MergeFormulation = "scatter") -> torch.Tensor:
    """Sum every source token into its destination, then keep the output tokens in order.

    x: [B, N, C] -> [B, N - r, C] ordered [prefix tokens, unmerged A, B]. Sources are summed into the
    B rows only (Nb of them), and the output is [unmerged A rows, B rows]: no gather over all N. The
    fused "plugin" op averages rather than sums, so plain sums (source tracking) take the matmul form under it.
    """
    add_at = _add_at_scatter if formulation == "scatter" else _add_at_matmul
    a, b = x[:, 0::2], x[:, 1::2]  # [B, Na, C], [B, Nb, C]
    b = add_at(b, gather_tokens(a, match.source_a), match.destination_b)  # [B, Nb, C]
    return in_output_order(gather_tokens(a, match.unmerged_a), b, match.num_prefix)  # [B, N - r, C]


def merge_weighted(
    x: torch.Tensor, size: torch.Tensor, match: Match, formulation: MergeFormulation = "scatter"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of each destination with its sources.

    x: [B, N, C], size: [B, N, 1] fp32 patch counts -> ([B, N - r, C], [B, N - r, 1]).
    """
    if formulation == "plugin":  # one fused tome::token_merge op (tome_deploy/token_merge/contract.py)
        from tome_deploy.token_merge.torch_op import token_merge

        return token_merge(x, size, *(index.to(torch.int32) for index in (match.kept, match.source, match.destination)))
    weighted = merge_sum(x * size, match, formulation)  # [B, N - r, C]
    size = merge_sum(size, match, formulation)  # [B, N - r, 1]
    return (weighted / size).to(x.dtype), size


def proportional_attention_bias(size: torch.Tensor) -> torch.Tensor:
    """size: [B, N, 1] -> [B, 1, 1, N] additive attention logits log(size_j) for every key j."""
    return size.log().transpose(1, 2)[:, None]
