"""Runs the Triton kernel of tome::TokenMerge under Triton's interpreter on CPU and prints one JSON line per case.

Started as a subprocess by test_token_merge_triton.py: TRITON_INTERPRET must be set before triton is
imported, and setting it inside the pytest process would change every other Triton user there.
Each case is checked against the plain float64 loop of reference_tome.reference_token_merge, and for
bit-equality with the library's reference implementation (the contract fixes the rounding steps).
"""

from __future__ import annotations

import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch
from reference_tome import reference_token_merge

from tome_deploy.core.merge import bipartite_match
from tome_deploy.token_merge.torch_op import token_merge_reference
from tome_deploy.token_merge.triton_kernel import launch


def random_indices(gen, batch, tokens, r, destinations=None):
    """Arbitrary (kept, source, destination): r random sources, destinations drawn from the kept tokens
    (with repeats), kept in a random order."""
    rows = []
    for _ in range(batch):
        perm = torch.randperm(tokens, generator=gen)
        source, kept = perm[:r], perm[r:]
        pool = kept if destinations is None else kept[:destinations]
        destination = pool[torch.randint(0, len(pool), (r,), generator=gen)]
        rows.append((kept, source, destination))
    return tuple(torch.stack(parts).int() for parts in zip(*rows))


def tome_indices(metric, r, prefix):
    match = bipartite_match(metric, r, prefix)
    return tuple(t.int() for t in (match.kept, match.source, match.destination))


def cases():
    """name -> (x [B, N, C], size [B, N, 1], kept, source, destination) in float32."""
    gen = torch.Generator().manual_seed(0)

    def tensors(batch, tokens, channels):
        x = torch.randn(batch, tokens, channels, generator=gen) * 3
        size = torch.randint(1, 9, (batch, tokens, 1), generator=gen).float()
        return x, size

    found = {}
    x, size = tensors(2, 17, 5)
    found["random_small"] = (x, size, *random_indices(gen, 2, 17, 4))
    x, size = tensors(3, 24, 300)  # two channel blocks, the second one partly masked
    found["random_two_channel_blocks"] = (x, size, *random_indices(gen, 3, 24, 7))
    x, size = tensors(2, 19, 40)
    found["duplicate_destinations"] = (x, size, *random_indices(gen, 2, 19, 8, destinations=2))
    x, size = tensors(2, 21, 33)
    found["tome_all_to_one_destination"] = (x, size, *tome_indices(torch.ones(2, 21, 4), 10, 1))
    x, size = tensors(2, 11, 16)
    found["r_1"] = (x, size, *tome_indices(torch.randn(2, 11, 8, generator=gen), 1, 1))
    x, size = tensors(2, 20, 24)
    found["r_max_tome"] = (x, size, *tome_indices(torch.randn(2, 20, 8, generator=gen), 10, 0))
    x, size = tensors(2, 8, 3)
    found["r_max_everything_into_one"] = (x, size, *random_indices(gen, 2, 8, 7))
    return found


def main() -> int:
    for name, (x, size, kept, source, destination) in cases().items():
        for dtype in (torch.float32, torch.float16):
            x_in = x.to(dtype)
            got_x, got_size = launch(x_in, size, kept, source, destination)
            ref_x, ref_size = token_merge_reference(x_in, size, kept, source, destination)
            plain_x, plain_size = reference_token_merge(x_in, size, kept, source, destination)
            scale = plain_x.abs().max().item()
            print(
                json.dumps(
                    {
                        "case": f"{name}-{str(dtype).rsplit('.', 1)[-1]}",
                        "dtype_ok": got_x.dtype == dtype and got_size.dtype == torch.float32,
                        "shape_ok": tuple(got_x.shape) == (x.shape[0], kept.shape[1], x.shape[2])
                        and tuple(got_size.shape) == (x.shape[0], kept.shape[1], 1),
                        "bit_equal_reference": torch.equal(got_x, ref_x) and torch.equal(got_size, ref_size),
                        "max_rel_error_plain": (got_x.double() - plain_x).abs().max().item() / scale,
                        "size_equal_plain": torch.equal(got_size.double(), plain_size),
                    }
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
