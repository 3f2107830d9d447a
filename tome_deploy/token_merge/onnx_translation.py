"""How the exporter writes `torch.ops.tome.token_merge`: one tome::TokenMerge node, not a local function.

Passed to torch.onnx.export(dynamo=True) as `custom_translation_table`; onnxscript then emits the node
in domain `tome` with the plugin attributes from contract.py and imports the `tome` opset.
"""

from __future__ import annotations

from tome_deploy.token_merge import contract


def custom_translation_table() -> dict:
    """{torch op overload: onnxscript translation} for torch.onnx.export."""
    from onnxscript import values

    from tome_deploy.token_merge.torch_op import TOKEN_MERGE_OVERLOAD

    contract.register_onnx_schema()  # onnxscript builds the node from the op's ONNX schema
    tome_opset = values.Opset(contract.OP_DOMAIN, contract.OP_DOMAIN_VERSION)

    def token_merge_node(x, size, kept, source, destination):
        return getattr(tome_opset, contract.OP_TYPE)(
            x, size, kept, source, destination, **contract.NODE_ATTRIBUTES, _outputs=len(contract.OUTPUTS)
        )

    return {TOKEN_MERGE_OVERLOAD: token_merge_node}
