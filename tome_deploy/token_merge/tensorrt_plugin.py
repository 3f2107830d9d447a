"""tome::TokenMerge as a TensorRT plugin: `tensorrt.plugin` (TensorRT >= 10.9) with an AOT implementation.

`register_tensorrt_plugin()` registers the plugin `tome::TokenMerge` (version "1") in TensorRT's plugin
registry, where the ONNX parser finds it for every TokenMerge node (by its plugin_namespace and
plugin_version attributes). Call it before parsing a graph for which contract.graph_has_token_merge()
is true. Only an AOT implementation is registered, so TensorRT always takes it: at build time it
compiles the Triton kernel (triton_kernel.py) to PTX for the building GPU and stores the PTX with its
launch parameters in the engine, which then runs without Python (trtexec, Triton Inference Server).

NOT EXECUTED in this repository's CI: tensorrt does not install on its CPU machines. What CI does check
is the part that needs no GPU: the same kernel compiles to PTX for sm_80 and sm_90, its entry point
takes exactly the arguments TensorRT passes (input pointers, the scalar arguments, output pointers),
and the PTX assembles with ptxas (tests/token_merge/test_token_merge_triton.py).

No `from __future__ import annotations` here: tensorrt.plugin reads the registration's type hints.
"""

from tome_deploy.errors import MissingDependencyError
from tome_deploy.token_merge import contract

_registered = False


def register_tensorrt_plugin() -> None:
    """Register tome::TokenMerge with TensorRT (idempotent). Needs tensorrt >= 10.9 and triton."""
    global _registered
    if _registered:
        return
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp

        from tome_deploy.token_merge import triton_kernel
    except ImportError as err:
        raise MissingDependencyError(
            f"building engines from --merge plugin graphs registers the TensorRT plugin {contract.PLUGIN_ID}, "
            f"which needs tensorrt >= 10.9 (tensorrt.plugin with AOT implementations) and triton ({err}); "
            "pip install 'tome-deploy[tensorrt,plugin]'"
        ) from err
    if not hasattr(trtp, "aot_impl"):
        raise MissingDependencyError(
            f"tensorrt {trt.__version__} has no tensorrt.plugin.aot_impl; {contract.PLUGIN_ID} needs tensorrt >= 10.9: "
            "pip install -U 'tensorrt>=10.9'"
        )
    dtype_names = {trt.float32: "float32", trt.float16: "float16"}

    @trtp.register(contract.PLUGIN_ID)
    def token_merge_shapes(
        x: trtp.TensorDesc,
        size: trtp.TensorDesc,
        kept: trtp.TensorDesc,
        source: trtp.TensorDesc,
        destination: trtp.TensorDesc,
    ) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        x_shape, size_shape = contract.output_shapes(x.shape_expr, kept.shape_expr)
        return trtp.from_shape_expr(x_shape, dtype=x.dtype), trtp.from_shape_expr(size_shape, dtype=size.dtype)

    @trtp.aot_impl(contract.PLUGIN_ID)
    def token_merge_kernel(x, size, kept, source, destination, outputs, tactic):
        if x.dtype not in dtype_names:
            raise ValueError(f"{contract.PLUGIN_ID} takes x as {' or '.join(contract.X_DTYPES)}, got {x.dtype}")
        kernel = triton_kernel.compile_ptx(dtype_names[x.dtype])  # for the GPU the engine is built on
        launch = trtp.KernelLaunchParams()
        launch.grid_x, launch.grid_y = triton_kernel.grid(x.shape_expr, kept.shape_expr)
        launch.block_x = kernel.threads
        launch.shared_mem = kernel.shared_bytes
        scalars = triton_kernel.scalar_arguments(x.shape_expr, kept.shape_expr, source.shape_expr)
        extra_args = trtp.SymIntExprs(len(scalars))
        for i, value in enumerate(scalars):
            extra_args[i] = trtp.SymInt32(value)
        return kernel.name, kernel.ptx, launch, extra_args

    _registered = True
