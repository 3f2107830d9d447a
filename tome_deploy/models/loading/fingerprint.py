"""The weights fingerprint: one sha256 over a model's state dict, stored in every export."""

from __future__ import annotations

import hashlib
import struct

import torch
from torch import nn


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 (hex) over the state dict: every entry's name, dtype, shape and bytes, in sorted name order."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for name in sorted(state):
        value = state[name]
        digest.update(_framed(name.encode()))
        if isinstance(value, torch.Tensor):
            tensor = value.detach()
            if tensor.is_sparse or tensor.layout != torch.strided:
                tensor = tensor.to_dense()
            tensor = tensor.cpu().contiguous()
            digest.update(_framed(str(tensor.dtype).encode()))
            digest.update(_framed(repr(tuple(tensor.shape)).encode()))
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            digest.update(struct.pack("<Q", data.nbytes))
            digest.update(memoryview(data))
        else:  # get_extra_state() payloads
            digest.update(_framed(b"object"))
            digest.update(_framed(repr(value).encode()))
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Small helpers


def _framed(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data
