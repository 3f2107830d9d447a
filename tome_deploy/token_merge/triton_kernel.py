"""The Triton kernel of tome::TokenMerge, its PyTorch launcher and its ahead-of-time compilation to PTX.

One program per (output token, block of BLOCK_C channels): it loads the kept token, walks the r
(source, destination) pairs in ascending j and adds every source whose destination is this token, so
each output is written by exactly one program: no atomics, a fixed summation order (contract.py).
The loop costs r scalar compares per program; for ViT shapes (r <= ~100) that is small next to the
channel loads. The kernel's argument order is TensorRT's for AOT plugins: input pointers, scalar
arguments, output pointers.

Importing this module imports triton. Set TRITON_INTERPRET=1 before the import to run it on CPU tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tome_deploy.token_merge import contract

BLOCK_C = 256  # channels per program; fixed, so one compiled kernel per dtype serves every model
NUM_WARPS = 4
# Rounding exactly as the contract says: products rounded before the sum, no fused multiply-add.
COMPILE_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}


@triton.jit
def token_merge_kernel(
    x_ptr,  # [B, N, C] T
    size_ptr,  # [B, N, 1] fp32
    kept_ptr,  # [B, N - r] int32
    source_ptr,  # [B, r] int32
    destination_ptr,  # [B, r] int32
    tokens,  # N
    channels,  # C
    merged_tokens,  # N - r
    merged_count,  # r
    merged_x_ptr,  # [B, N - r, C] T
    merged_size_ptr,  # [B, N - r, 1] fp32
    BLOCK_C: tl.constexpr,
):
    row = tl.program_id(0)  # b * (N - r) + i
    channel_block = tl.program_id(1)
    image = row // merged_tokens
    position = tl.load(kept_ptr + row)
    channel = channel_block * BLOCK_C + tl.arange(0, BLOCK_C)  # [BLOCK_C]
    in_range = channel < channels

    token = (image * tokens + position).to(tl.int64)
    total = tl.load(size_ptr + token)
    acc = tl.load(x_ptr + token * channels + channel, mask=in_range, other=0.0).to(tl.float32) * total
    for j in range(merged_count):  # ascending j: the contract's summation order
        pair = image * merged_count + j
        hit = tl.load(destination_ptr + pair) == position
        src = (image * tokens + tl.load(source_ptr + pair)).to(tl.int64)
        src_size = tl.load(size_ptr + src)
        src_x = tl.load(x_ptr + src * channels + channel, mask=in_range & hit, other=0.0).to(tl.float32)
        acc = tl.where(hit, acc + src_x * src_size, acc)
        total = tl.where(hit, total + src_size, total)

    merged = tl.math.div_rn(acc, total)  # IEEE division; a plain `/` is approximate on GPUs
    out_row = row.to(tl.int64)
    tl.store(merged_x_ptr + out_row * channels + channel, merged.to(merged_x_ptr.dtype.element_ty), mask=in_range)
    tl.store(merged_size_ptr + out_row, total, mask=channel_block == 0)


# Shared by the PyTorch launcher (ints) and the TensorRT plugin (TensorRT's symbolic shape expressions).
def scalar_arguments(x_shape, kept_shape, source_shape) -> tuple:
    """The kernel's scalar arguments, in order: tokens N, channels C, merged tokens N - r, merged count r."""
    return x_shape[1], x_shape[2], kept_shape[1], source_shape[1]


def grid(x_shape, kept_shape) -> tuple:
    """(B * (N - r) output tokens, channel blocks)."""
    return x_shape[0] * kept_shape[1], (x_shape[2] + (BLOCK_C - 1)) // BLOCK_C


def launch(
    x: torch.Tensor, size: torch.Tensor, kept: torch.Tensor, source: torch.Tensor, destination: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel on torch tensors (CUDA, or CPU under TRITON_INTERPRET=1)."""
    contract.check_inputs(x, size, kept, source, destination)
    x, size, kept, source, destination = (t.contiguous() for t in (x, size, kept, source, destination))
    x_shape, size_shape = contract.output_shapes(x.shape, kept.shape)
    merged_x, merged_size = x.new_empty(x_shape), size.new_empty(size_shape)
    if merged_x.numel():
        token_merge_kernel[grid(x.shape, kept.shape)](
            x,
            size,
            kept,
            source,
            destination,
            *scalar_arguments(x.shape, kept.shape, source.shape),
            merged_x,
            merged_size,
            BLOCK_C=BLOCK_C,
            **COMPILE_OPTIONS,
        )
    return merged_x, merged_size


@dataclass(frozen=True)
class CompiledKernel:
    """What an ahead-of-time launcher (TensorRT) needs: entry point, PTX and launch resources."""

    name: str
    ptx: str
    threads: int  # per block
    shared_bytes: int


_TRITON_DTYPES = {"float32": "fp32", "float16": "fp16"}
# Triton types of the kernel's arguments in order ({t}: the dtype of x and merged_x).
_ARGUMENT_TYPES = ("*{t}", "*fp32", "*i32", "*i32", "*i32", "i32", "i32", "i32", "i32", "*{t}", "*fp32")


def compile_ptx(x_dtype: str, capability: int | None = None) -> CompiledKernel:
    """PTX of the kernel for x of `x_dtype` ("float32"/"float16") on compute capability `capability`
    (e.g. 80, 90; None: the current GPU). Needs no GPU when `capability` is given."""
    from triton.backends.compiler import GPUTarget

    if x_dtype not in _TRITON_DTYPES:
        raise ValueError(f"x dtype must be one of {contract.X_DTYPES}, got {x_dtype!r}")
    names = [name for name in token_merge_kernel.arg_names if name != "BLOCK_C"]
    signature = {
        name: kind.format(t=_TRITON_DTYPES[x_dtype]) for name, kind in zip(names, _ARGUMENT_TYPES, strict=True)
    }
    source = triton.compiler.ASTSource(
        fn=token_merge_kernel, signature={**signature, "BLOCK_C": "constexpr"}, constexprs={"BLOCK_C": BLOCK_C}
    )
    target = None if capability is None else GPUTarget("cuda", capability, 32)
    compiled = triton.compile(source, target=target, options=COMPILE_OPTIONS)
    metadata = compiled.metadata
    if metadata.global_scratch_size or getattr(metadata, "profile_scratch_size", 0):
        raise RuntimeError("the kernel now needs Triton scratch memory, which an AOT launcher does not provide")
    ptx = drop_hidden_parameters(compiled.asm["ptx"], metadata.name, len(signature))
    return CompiledKernel(metadata.name, ptx, metadata.num_warps * 32, metadata.shared)


def entry_parameters(ptx: str, entry: str) -> list[str]:
    """Names of the parameters of `.entry <entry>(...)` in PTX text."""
    match = re.search(rf"\.entry\s+{re.escape(entry)}\s*\((.*?)\)", ptx, re.S)
    if match is None:
        raise ValueError(f"no .entry {entry} in the PTX")
    return re.findall(r"\.param\s+[^,]*?(\S+)\s*(?:,|$)", match.group(1).strip())


def drop_hidden_parameters(ptx: str, entry: str, declared: int) -> str:
    """Remove the pointer parameters Triton appends after the declared ones (global and profile scratch).

    Triton's own launcher passes them; an AOT launcher such as TensorRT passes exactly the kernel's
    declared arguments. They are removed only when the kernel body never reads them.
    """
    names = entry_parameters(ptx, entry)
    hidden = names[declared:]
    body = ptx.split(f".entry {entry}", 1)[1]
    used = [name for name in hidden if re.search(rf"\[{re.escape(name)}\]", body)]
    if used:
        raise RuntimeError(f"the kernel reads Triton's hidden parameters {used}; an AOT launcher cannot provide them")
    for name in hidden:
        ptx = re.sub(rf",\s*\n?\s*\.param[^,)]*?{re.escape(name)}(?=\s*[,)])", "", ptx, count=1)
    return ptx
