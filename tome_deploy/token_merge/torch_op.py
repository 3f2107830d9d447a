"""`torch.ops.tome.token_merge`: the contract as a torch.library custom op.

CPU (and any device without a kernel of its own): `token_merge_reference`, a plain loop in the
contract's summation order. CUDA: the Triton kernel. The fake implementation gives torch.export the
output shapes, so the op traces as one node that the ONNX exporter turns into tome::TokenMerge.
"""

from __future__ import annotations

import torch

from tome_deploy.core.merge import Match
from tome_deploy.errors import MissingDependencyError
from tome_deploy.token_merge import contract


@torch.library.custom_op(contract.TORCH_OP, mutates_args=())
def token_merge(
    x: torch.Tensor, size: torch.Tensor, kept: torch.Tensor, source: torch.Tensor, destination: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """See contract.py. x [B, N, C], size [B, N, 1], kept [B, N - r], source/destination [B, r] int32."""
    return token_merge_reference(x, size, kept, source, destination)


# The overload torch.export records and the ONNX exporter translates (onnx_translation.py).
TOKEN_MERGE_OVERLOAD = torch.ops.tome.token_merge.default


def merge_weighted_fused(x: torch.Tensor, size: torch.Tensor, match: Match) -> tuple[torch.Tensor, torch.Tensor]:
    """core.merge.merge_weighted as one op: x [B, N, C], size [B, N, 1] fp32 -> ([B, N - r, C], [B, N - r, 1]),
    the Match's positions (kept [B, N - r], source and destination [B, r]) passed as int32."""
    return token_merge(x, size, *(index.to(torch.int32) for index in (match.kept, match.source, match.destination)))


def token_merge_reference(
    x: torch.Tensor, size: torch.Tensor, kept: torch.Tensor, source: torch.Tensor, destination: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract written out: sources added one j at a time (ascending), float32 throughout."""
    contract.check_inputs(x, size, kept, source, destination)
    weighted = x.float() * size  # [B, N, C]: every product rounded once, as the contract says
    sums, totals = weighted.clone(), size.clone()  # [B, N, C], [B, N, 1]
    batch = torch.arange(x.shape[0], device=x.device)  # [B]
    for j in range(source.shape[1]):  # one source per image per step, so no index repeats within a step
        src, dst = source[:, j].long(), destination[:, j].long()  # [B], [B]
        sums[batch, dst] += weighted[batch, src]
        totals[batch, dst] += size[batch, src]
    rows = batch[:, None], kept.long()  # gather the output tokens in kept order
    merged_size = totals[rows]  # [B, N - r, 1]
    return (sums[rows] / merged_size).to(x.dtype), merged_size


@token_merge.register_fake
def _token_merge_shapes(x, size, kept, source, destination):
    contract.check_inputs(x, size, kept, source, destination)
    x_shape, size_shape = contract.output_shapes(x.shape, kept.shape)
    return x.new_empty(x_shape), size.new_empty(size_shape)


@token_merge.register_kernel("cuda")
def _token_merge_cuda(x, size, kept, source, destination):
    try:
        from tome_deploy.token_merge.triton_kernel import launch
    except ImportError as err:
        raise MissingDependencyError(
            f"{contract.TORCH_OP} on CUDA tensors runs a Triton kernel, but triton is not importable ({err}); "
            "pip install 'tome-deploy[plugin]' (or pip install triton)"
        ) from err
    return launch(x, size, kept, source, destination)
