"""The fused `tome::TokenMerge` op (`--merge plugin`): one contract, one implementation per runtime.

    contract.py         the written-down contract: names, shapes, dtypes, summation order, attributes
    torch_op.py         the torch.library op `tome::token_merge`: plain reference on CPU, Triton on CUDA
    triton_kernel.py    the Triton kernel, its launcher and its ahead-of-time (PTX) compilation
    onnx_translation.py the exporter's translation: one `tome::TokenMerge` node per merging block
    ort_op.py           the ONNX Runtime CPU implementation (onnxruntime-extensions Python op)
    tensorrt_plugin.py  the TensorRT plugin (`tensorrt.plugin`, AOT: the Triton kernel's PTX in the engine)
    formulation.py      the `plugin` merge formulation (artifact/formulations.py), which ties them together

Only contract.py and formulation.py are imported eagerly (by the formulation registry); everything that
needs torch, triton, onnxruntime-extensions or tensorrt imports it when it is used.
"""
