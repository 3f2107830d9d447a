"""tome::TokenMerge in ONNX Runtime on CPU, through an onnxruntime-extensions Python op.

Python ops live in onnxruntime-extensions' own domain and support float32 but not float16, so the
runner hands ONNX Runtime an in-memory copy of the graph (the file is never touched) in which every
tome::TokenMerge node is moved to that domain and, for float16 tokens, wrapped in Casts to and from
float32. That is exact: the contract accumulates in float32 and rounds to float16 once at the end.
The op itself is torch_op.token_merge_reference, so ONNX Runtime follows the contract's summation order.
"""

from __future__ import annotations

from pathlib import Path

from tome_deploy.artifact.onnx_file import load_onnx
from tome_deploy.errors import MissingDependencyError
from tome_deploy.token_merge import contract

INSTALL_HINT = "pip install 'tome-deploy[plugin]' (or pip install onnxruntime-extensions)"

_registered = False


def require_extensions():
    """The onnxruntime_extensions module, or a MissingDependencyError that says what to install."""
    try:
        import onnxruntime_extensions
    except ImportError as err:
        raise MissingDependencyError(
            f"--merge plugin graphs (tome::{contract.OP_TYPE} nodes) run in ONNX Runtime through "
            f"onnxruntime-extensions, which is not installed: {INSTALL_HINT}"
        ) from err
    return onnxruntime_extensions


def _token_merge_numpy(x, size, kept, source, destination):
    import torch

    from tome_deploy.token_merge.torch_op import token_merge_reference

    merged_x, merged_size = token_merge_reference(*(torch.as_tensor(a) for a in (x, size, kept, source, destination)))
    return merged_x.numpy(), merged_size.numpy()


def register_python_op() -> str:
    """Register the float32 Python op once per process; returns the custom-op library to load in a session."""
    global _registered
    extensions = require_extensions()
    if not _registered:
        types = extensions.PyCustomOpDef
        extensions.onnx_op(
            op_type=contract.OP_TYPE,
            inputs=[types.dt_float, types.dt_float, types.dt_int32, types.dt_int32, types.dt_int32],
            outputs=[types.dt_float, types.dt_float],
        )(_token_merge_numpy)
        _registered = True
    return extensions.get_library_path()


def _elem_types(graph) -> dict[str, int]:
    values = list(graph.input) + list(graph.value_info) + list(graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in values}


def rewrite_for_python_op(model, python_domain: str):
    """Move every tome::TokenMerge node of `model` (modified in place) to the Python op's domain,
    wrapping float16 tokens in Casts to and from float32."""
    import onnx
    from onnx import TensorProto, helper

    elem_types = _elem_types(model.graph)
    if any(contract.is_token_merge_node(n) and n.input[0] not in elem_types for n in model.graph.node):
        elem_types = _elem_types(onnx.shape_inference.infer_shapes(model).graph)
    nodes = []
    for node in model.graph.node:
        if not contract.is_token_merge_node(node):
            nodes.append(node)
            continue
        node.domain = python_domain
        if elem_types.get(node.input[0]) == TensorProto.FLOAT16:
            x_fp32, merged_fp32 = f"{node.input[0]}__{node.name}_fp32", f"{node.output[0]}__fp32"
            nodes.append(
                helper.make_node("Cast", [node.input[0]], [x_fp32], to=TensorProto.FLOAT, name=f"{node.name}_to_fp32")
            )
            merged = node.output[0]
            node.input[0], node.output[0] = x_fp32, merged_fp32
            nodes.append(node)
            nodes.append(
                helper.make_node("Cast", [merged_fp32], [merged], to=TensorProto.FLOAT16, name=f"{node.name}_to_fp16")
            )
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    imports = [o for o in model.opset_import if o.domain not in (contract.OP_DOMAIN, python_domain)]
    del model.opset_import[:]
    model.opset_import.extend(imports + [helper.make_opsetid(python_domain, 1)])
    return model


def session_model(path: str | Path, options) -> str | bytes:
    """What to pass to onnxruntime.InferenceSession: the path itself for graphs without tome::TokenMerge;
    otherwise the rewritten graph as bytes, with the Python op's library registered in `options`. External
    weights stay where they are: ONNX Runtime reads them from the graph's folder (session config
    `session.model_external_initializers_file_folder_path`, for a model given as bytes), so a model with
    weights over 2 GiB never becomes one protobuf message."""
    model = load_onnx(path)
    if not contract.graph_has_token_merge(model):
        return str(path)
    options.register_custom_ops_library(register_python_op())
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(Path(path).resolve().parent)
    )
    return rewrite_for_python_op(model, require_extensions().default_opset_domain()).SerializeToString()
