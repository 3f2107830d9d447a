"""Token Merging math: bipartite soft matching and size-weighted merging.

Pure tensor functions with static output shapes for a given (tokens, r, prefix count), so that the
same code runs eagerly, traces with torch.export and becomes a fixed-shape ONNX graph.

Shapes: B batch, N tokens, C channels, p prefix tokens (class, distillation, registers), which sit at
positions 0..p-1. Set A holds the even positions, set B the odd ones; A' and B' are their non-prefix
tokens (Na' = ceil(N/2) - ceil(p/2), Nb' = floor(N/2) - floor(p/2)), the only ones matching can merge."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from tome_deploy.artifact.formulations import MergeFormulation, get_formulation
from tome_deploy.core.tracing import exporting_onnx, topk_orders_ties


class Match(NamedTuple):
    """Where tokens go, as index columns into A' and B': the non-prefix tokens of set A and of set B.

    Index columns ([B, K, 1]) are what GatherND(batch_dims=1) takes, so they export with no Unsqueeze.
    The output order is [prefix tokens, unmerged A', B'] (`in_output_order`); `kept`, `source` and
    `destination` give the same match as token positions (the fused op's contract)."""

    source_a: torch.Tensor  # [B, r, 1]       A' indices merged away
    destination_b: torch.Tensor  # [B, r, 1]       B' index each source merges into
    unmerged_a: torch.Tensor  # [B, Na' - r, 1] A' indices kept: ascending with prefix tokens, else in score order
    num_tokens: int  # N
    num_prefix: int  # p

    @property
    def source(self) -> torch.Tensor:
        return first_candidates(self.num_prefix)[0] + 2 * self.source_a[..., 0]  # [B, r] positions

    @property
    def destination(self) -> torch.Tensor:
        return first_candidates(self.num_prefix)[1] + 2 * self.destination_b[..., 0]  # [B, r] positions

    @property
    def kept(self) -> torch.Tensor:
        """[B, N - r] positions of the output tokens, in output order."""
        # Positions as a column [B, N, 1] through the same split and gather as the tokens themselves.
        zeros = self.unmerged_a.sum(dim=1, keepdim=True) * 0  # [B, 1, 1], also when no A' token stays unmerged
        positions = zeros + torch.arange(self.num_tokens, device=zeros.device)[:, None]  # [B, N, 1]
        prefix, a, b = split_tokens(positions, self.num_prefix)
        return in_output_order(prefix, gather_tokens(a, self.unmerged_a), b)[..., 0]


def first_candidates(num_prefix: int) -> tuple[int, int]:
    """Positions of the first non-prefix A token (even) and B token (odd): A' and B' step by 2 from them."""
    return num_prefix + num_prefix % 2, num_prefix + 1 - num_prefix % 2


def split_tokens(x: torch.Tensor, num_prefix: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [B, N, ...] -> (prefix [B, p, ...], A' [B, Na', ...], B' [B, Nb', ...]), three Slices.

    Leaving the prefix tokens out of A' and B' protects them with no mask: they can be neither a source nor a
    destination, and stay first in the output in position order."""
    a_start, b_start = first_candidates(num_prefix)
    return x[:, :num_prefix], x[:, a_start::2], x[:, b_start::2]


def bipartite_match(metric: torch.Tensor, r: int, num_prefix: int) -> Match:
    """Pick the r most similar (A', B') pairs.

    metric: [B, N, c] attention keys averaged over heads. r must already be clamped to
    (N - num_prefix) // 2 by the schedule, which is at most Na'.
    """
    # Cosine similarity in fp32: the sum of squares overflows fp16.
    metric = metric.float()
    metric = metric / metric.norm(dim=-1, keepdim=True)  # [B, N, c]
    _, a, b = split_tokens(metric, num_prefix)  # [B, Na', c], [B, Nb', c]
    scores = a @ b.transpose(-1, -2)  # [B, Na', Nb']
    # Ties -> lowest B' index (torch.max, ONNX ArgMax). ReduceMax + ArgMax beat one TopK(k=1) in ONNX Runtime
    # from batch 8 on (72 against 113 us on [8, 98, 98]).
    best_score, best_b = scores.max(dim=-1, keepdim=True)  # [B, Na', 1] each
    source_a, unmerged_a = split_by_score(best_score, r, num_prefix > 0)  # [B, r, 1], [B, Na' - r, 1]
    destination_b = best_b.gather(1, source_a)  # [B, r, 1]
    return Match(source_a, destination_b, unmerged_a, metric.shape[1], num_prefix)


def split_by_score(best_score: torch.Tensor, r: int, ascending_unmerged: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """best_score: [B, M, 1] -> (sources [B, r, 1], unmerged [B, M - r, 1]) index columns.

    Sources are the r best scores in a stable descending order (ties -> lower index). The unmerged go in
    ascending index when `ascending_unmerged` (the reference, with prefix tokens), else stay in score order.
    Exported for ONNX Runtime / OpenVINO, whose TopK orders ties by the lower index (ONNX spec), this is
    one TopK over the scores and one over the unmerged indices; otherwise a counting rank
    (`stable_descending_rank`) and one TopK of distinct keys.
    """
    num = best_score.shape[1]
    if topk_orders_ties():
        order = best_score.topk(num, dim=1, largest=True, sorted=True).indices  # [B, M, 1]
        source, unmerged = order[:, :r], order[:, r:]
        if ascending_unmerged and num - r > 1:
            unmerged = unmerged.topk(num - r, dim=1, largest=False, sorted=True).values
        return source, unmerged
    rank = stable_descending_rank(best_score[..., 0])  # [B, M]
    if ascending_unmerged:
        # Unmerged keys r + index are distinct and above every source's rank 0..r-1 (two nodes, no CumSum).
        index = torch.arange(num, device=rank.device, dtype=rank.dtype)  # [M]
        rank = torch.where(rank < r, rank, r + index)
    order = permutation_from_rank(rank)[..., None]  # [B, M, 1]: sources in score order, then unmerged
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


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: [B, N, C], index: [B, K, 1] int64 -> [B, K, C], whole rows per image.

    Whole rows (GatherND) are ~7x faster in ONNX Runtime than GatherElements, whose index would have to
    be expanded over C. While onnx_export traces (`core.tracing`), the rows come from the `gather_tokens_op`
    custom op, which tome-deploy's exporter writes as one GatherND(batch_dims=1) with static shapes; advanced
    indexing (what a plain torch.onnx.export gets) exports an Expand to a computed shape instead.
    """
    if exporting_onnx():
        return gather_tokens_op(x, index)
    return _gather_rows(x, index)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x[torch.arange(x.shape[0], device=x.device)[:, None], index[..., 0]]


@torch.library.custom_op("tome_deploy::gather_tokens", mutates_args=())
def gather_tokens_op(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """gather_tokens as one opaque op for torch.export: [B, N, C], [B, K, 1] -> [B, K, C]."""
    return _gather_rows(x, index)


@gather_tokens_op.register_fake
def _gather_tokens_shape(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], index.shape[1], *x.shape[2:]))


@torch.library.custom_op("tome_deploy::destination_rows", mutates_args=())
def destination_rows_op(destination: torch.Tensor) -> torch.Tensor:
    """[B, r, 1] row indices -> [B, r, 2] (image, row) pairs, the index ScatterND takes."""
    image = torch.arange(destination.shape[0], device=destination.device)[:, None, None].expand_as(destination)
    return torch.cat([image, destination], dim=-1)


@destination_rows_op.register_fake
def _destination_rows_shape(destination: torch.Tensor) -> torch.Tensor:
    return destination.new_empty((*destination.shape[:2], 2))


@torch.library.custom_op("tome_deploy::add_rows", mutates_args=())
def add_rows_op(x: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x: [B, M, C] with each src row [B, r, C] summed in at its (image, row) pair [B, r, 2]: ScatterND add."""
    return x.index_put((rows[..., 0], rows[..., 1]), src, accumulate=True)


@add_rows_op.register_fake
def _add_rows_shape(x: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


# The overloads torch.export records and onnx_export translates.
GATHER_TOKENS_OVERLOAD = torch.ops.tome_deploy.gather_tokens.default
DESTINATION_ROWS_OVERLOAD = torch.ops.tome_deploy.destination_rows.default
ADD_ROWS_OVERLOAD = torch.ops.tome_deploy.add_rows.default


def scatter_row_adder(destination: torch.Tensor, num_rows: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The `scatter` formulation's adder. destination: [B, r, 1] -> add(x [B, num_rows, C], src [B, r, C])
    summing each src row into its destination row; the index is built once, shared by every tensor merged
    with the same Match.

    ScatterElements(add) eagerly; exported, ScatterND(add) on whole rows, which ONNX Runtime runs ~6x faster
    (ScatterElements indexes every element)."""
    if exporting_onnx():
        rows = destination_rows_op(destination)  # [B, r, 2]
        return lambda x, src: add_rows_op(x, src, rows)
    return lambda x, src: x.scatter_add(1, destination.expand(-1, -1, x.shape[-1]), src)


def onehot_row_adder(destination: torch.Tensor, num_rows: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The `matmul` formulation's adder: a one-hot matmul, no scatter op, so every runtime (TensorRT-RTX too)
    takes it. destination: [B, r, 1] -> add(x [B, num_rows, C], src [B, r, C]) -> [B, num_rows, C]."""
    slots = torch.arange(num_rows, device=destination.device)  # [M]
    hits = destination == slots  # [B, r, M]
    onehot: dict[torch.dtype, torch.Tensor] = {}  # one Cast per dtype merged

    def add(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        if src.dtype not in onehot:
            onehot[src.dtype] = hits.to(src.dtype)
        return x + onehot[src.dtype].transpose(1, 2) @ src  # [B, M, C]

    return add


def merge_sums(
    tensors: list[torch.Tensor], match: Match, formulation: MergeFormulation | str = "scatter"
) -> list[torch.Tensor]:
    """Sum every source token into its destination, then keep the output tokens in order, for each tensor.

    Each x: [B, N, C] -> [B, N - r, C] ordered [prefix tokens, unmerged A', B']. Sources are summed into the
    B' rows only, by the formulation's row adder, and the output is one Concat: no gather over all N.
    """
    num_b = match.num_tokens // 2 - match.num_prefix // 2  # Nb'
    add = get_formulation(formulation).row_adder(match.destination_b, num_b)
    merged = []
    for x in tensors:
        prefix, a, b = split_tokens(x, match.num_prefix)  # [B, p, C], [B, Na', C], [B, Nb', C]
        b = add(b, gather_tokens(a, match.source_a))  # [B, Nb', C]
        merged.append(in_output_order(prefix, gather_tokens(a, match.unmerged_a), b))
    return merged


def merge_sum(x: torch.Tensor, match: Match, formulation: MergeFormulation | str = "scatter") -> torch.Tensor:
    """merge_sums of one tensor: x [B, N, C] -> [B, N - r, C]."""
    return merge_sums([x], match, formulation)[0]


def in_output_order(prefix: Optional[torch.Tensor], unmerged: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[B, p, ...] or None, [B, Na' - r, ...], [B, Nb', ...] -> [B, N - r, ...], one Concat of the non-empty parts."""
    return torch.cat([part for part in (prefix, unmerged) if part is not None and part.shape[1] > 0] + [b], dim=1)


def kept_tokens(x: torch.Tensor, match: Match) -> torch.Tensor:
    """x: [B, N - p, D] per-token data of the non-prefix tokens (e.g. Eva's rotary angles) -> [B, N - r - p, D]
    the rows of the kept ones, in output order: the RoPE rule, kept tokens keep their data."""
    a_start, b_start = (start - match.num_prefix for start in first_candidates(match.num_prefix))
    a, b = x[:, a_start::2], x[:, b_start::2]  # [B, Na', D], [B, Nb', D]
    return in_output_order(None, gather_tokens(a, match.unmerged_a), b)


def merge_weighted(
    x: torch.Tensor, size: torch.Tensor, match: Match, formulation: MergeFormulation | str = "scatter"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average of each destination with its sources: the formulation's fused merge when it
    has one (the plugin's single tome::token_merge op), else sums of x * size and of size, divided.

    x: [B, N, C], size: [B, N, 1] fp32 patch counts -> ([B, N - r, C], [B, N - r, 1]).
    """
    formulation = get_formulation(formulation)
    if formulation.fused_merge is not None:
        return formulation.fused_merge(x, size, match)
    weighted, size = merge_sums([x * size, size], match, formulation)  # [B, N - r, C], [B, N - r, 1]
    return (weighted / size).to(x.dtype), size


def proportional_attention_bias(size: torch.Tensor) -> torch.Tensor:
    """size: [B, N, 1] -> [B, 1, 1, N] additive attention logits log(size_j) for every key j."""
    return size.log().transpose(1, 2)[:, None]
