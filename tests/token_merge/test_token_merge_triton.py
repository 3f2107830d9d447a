"""The Triton kernel of tome::TokenMerge: correctness under TRITON_INTERPRET=1 on CPU, and AOT PTX for sm_80/sm_90.

The interpreter runs in a subprocess (tests/triton_interpret_cases.py) so that TRITON_INTERPRET is set
before triton is imported there and nowhere else.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parents[1]
CASES = [
    f"{name}-{dtype}"
    for name in (
        "random_small",
        "random_two_channel_blocks",
        "duplicate_destinations",
        "tome_all_to_one_destination",
        "r_1",
        "r_max_tome",
        "r_max_everything_into_one",
    )
    for dtype in ("float32", "float16")
]
# Relative to the largest |output|: float32 carries a few roundings; float16 adds one final rounding (2^-11).
TOLERANCE = {"float32": 1e-6, "float16": 1e-3}


@pytest.fixture(scope="module")
def interpreted():
    """case name -> result line, from one interpreter run of every case."""
    done = subprocess.run(
        [sys.executable, str(TESTS / "triton_interpret_cases.py")],
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {row["case"]: row for row in map(json.loads, done.stdout.splitlines())}


@pytest.mark.parametrize("case", CASES)
def test_interpreted_kernel_equals_reference(interpreted, case):
    row = interpreted[case]
    assert row["shape_ok"] and row["dtype_ok"], row
    assert row["size_equal_plain"], row  # sizes are small integers: exact
    assert row["max_rel_error_plain"] < TOLERANCE[case.rsplit("-", 1)[1]], row
    # The contract fixes every rounding step, so the kernel and the reference agree bit for bit.
    assert row["bit_equal_reference"], row


def test_interpreter_did_not_leak_into_this_process():
    import os

    assert "TRITON_INTERPRET" not in os.environ


@pytest.fixture(scope="module")
def triton_kernel():
    from tome_deploy.token_merge import triton_kernel

    return triton_kernel


@pytest.mark.parametrize("capability, arch", [(80, "sm_80"), (90, "sm_90a")])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_aot_ptx_names_the_entry_point_and_takes_tensorrts_arguments(triton_kernel, tmp_path, capability, arch, dtype):
    """No GPU here: Triton compiles for an explicit target; its bundled ptxas checks the PTX we hand on."""
    from triton import knobs

    kernel = triton_kernel.compile_ptx(dtype, capability)
    assert kernel.name == "token_merge_kernel"
    assert re.search(rf"\.visible\s+\.entry\s+{kernel.name}\s*\(", kernel.ptx)
    assert re.search(rf"\.target\s+{arch}\b", kernel.ptx)
    # TensorRT passes 5 input pointers, 4 int32 scalars, 2 output pointers and nothing else.
    params = triton_kernel.entry_parameters(kernel.ptx, kernel.name)
    assert len(params) == 11
    declarations = re.search(rf"\.entry\s+{kernel.name}\s*\((.*?)\)", kernel.ptx, re.S).group(1)
    kinds = re.findall(r"\.param\s+\.(u64|u32)", declarations)
    assert kinds == ["u64"] * 5 + ["u32"] * 4 + ["u64"] * 2
    assert kernel.threads == 128 and kernel.shared_bytes == 0
    ptx = tmp_path / "token_merge.ptx"
    ptx.write_text(kernel.ptx)
    assembled = subprocess.run(
        [knobs.nvidia.ptxas.path, f"--gpu-name={arch}", str(ptx), "-o", str(tmp_path / "k.cubin")],
        capture_output=True,
        text=True,
    )
    assert assembled.returncode == 0, assembled.stderr


PTX_WITH_SCRATCH = """
.visible .entry k(
\t.param .u64 .ptr .global .align 1 k_param_0,
\t.param .u32 k_param_1,
\t.param .u64 .ptr .global .align 1 k_param_2,
\t.param .u64 .ptr .global .align 1 k_param_3
)
{
\tld.param.b64 \t%rd1, [k_param_0];
\tld.param.b32 \t%r1, [k_param_1];
BODY
}
"""


def test_hidden_parameters_are_dropped_only_when_unused(triton_kernel):
    unused = PTX_WITH_SCRATCH.replace("BODY", "")
    dropped = triton_kernel.drop_hidden_parameters(unused, "k", 2)
    assert triton_kernel.entry_parameters(dropped, "k") == ["k_param_0", "k_param_1"]
    assert "ld.param.b32 \t%r1, [k_param_1];" in dropped
    used = PTX_WITH_SCRATCH.replace("BODY", "\tld.param.b64 \t%rd2, [k_param_2];")
    with pytest.raises(RuntimeError, match="hidden parameters"):
        triton_kernel.drop_hidden_parameters(used, "k", 2)


def test_grid_covers_every_output_token_and_channel(triton_kernel):
    # [B=3, N=197, C=384] merging r=16: 3 * 181 output tokens, 384 channels in blocks of 256.
    assert triton_kernel.grid((3, 197, 384), (3, 181)) == (543, 2)
    assert triton_kernel.grid((1, 10, 256), (1, 9)) == (9, 1)
    assert triton_kernel.scalar_arguments((3, 197, 384), (3, 181), (3, 16)) == (197, 384, 181, 16)


def test_tensorrt_plugin_without_tensorrt_names_what_to_install():
    """tensorrt cannot be installed on CPU CI; registering the plugin then is a typed error naming the install."""
    import importlib.util

    from tome_deploy.errors import MissingDependencyError
    from tome_deploy.token_merge.tensorrt_plugin import register_tensorrt_plugin

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("tensorrt is installed here, so the plugin registers instead of failing")
    with pytest.raises(MissingDependencyError, match=r"tensorrt >= 10.9.*pip install"):
        register_tensorrt_plugin()
