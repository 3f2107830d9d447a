"""The one declarative export spec, read by both the exporter and the validator so they cannot disagree:
tensor names, opsets, targets and their default merge formulation, precisions and parity tolerances. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from tome_deploy.errors import InvalidInputError

# Where the export will run, and the merge formulation (artifact/formulations.py) an export for it uses
# unless --merge says otherwise. tensorrt: a merge formulation TensorRT and TensorRT-RTX parse natively.
TARGETS: tuple[str, ...] = ("onnxruntime", "tensorrt")
TARGET_DEFAULT_MERGE = {"onnxruntime": "scatter", "tensorrt": "matmul"}
# fp16: weights and activations in fp16, inputs/outputs fp32; matching and log(size) stay fp32.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
# An export too large for one file keeps its weights in the graph's name plus this: out.onnx -> out.onnx.data.
EXTERNAL_DATA_SUFFIX = ".data"


@dataclass(frozen=True)
class Tolerance:
    """One parity budget: |diff| <= atol + rtol * |ref| everywhere and cosine >= min_cosine."""

    atol: float
    rtol: float
    min_cosine: float


@dataclass(frozen=True)
class ExportSpec:
    input_name: str = "pixel_values"
    output_name: str = "logits"
    batch_axis_name: str = "batch"
    # The largest batch an export traces or accepts: the bound of the dynamic batch axis, and the most
    # images a --static-batch trace and its validation allocate at once.
    max_batch: int = 4096
    default_opset: int = 18
    # ScatterND / ScatterElements(reduction="add") exist from opset 16; below them the sum is silently dropped.
    min_opset: int = 16
    # The exporter only targets opsets the ONNX checker and ONNX Runtime 1.2x both know.
    max_opset: int = 22
    # A serialized ONNX model is one protobuf message, which cannot reach 2 GiB. When its weights (the
    # initializers' bytes) are over this (and always with --external-data) the export writes the graph and
    # puts its weights in ONE external-data file beside it (ONNX's external-data layout, which ONNX Runtime,
    # OpenVINO and TensorRT's parser read). The 64 MiB margin holds the graph itself (about 4 MiB for a
    # 32-block ViT-H) and leaves room for a tool that adds to a single file (metadata, an optimised copy).
    single_file_max_weight_bytes: int = 2**31 - 2**26
    # Tensors smaller than this stay inside the graph (shapes, indices, scalars): graph-only readers and
    # shape inference see them without the weights.
    external_tensor_min_bytes: int = 1024
    fp32: Tolerance = Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.99999)
    # fp16 export vs the same model run by PyTorch in fp16: kernels round differently in the last bits.
    fp16: Tolerance = Tolerance(atol=2e-2, rtol=2e-2, min_cosine=0.999)

    def tolerance(self, precision: str) -> Tolerance:
        return self.fp16 if precision == "fp16" else self.fp32

    def check_batch(self, batch: int, flag: str = "--batch-size") -> int:
        if not 1 <= batch <= self.max_batch:
            raise InvalidInputError(
                f"{flag} must be from 1 to {self.max_batch}, got {batch}; pass a batch size in that range"
            )
        return batch

    def check_opset(self, opset: int) -> int:
        if not self.min_opset <= opset <= self.max_opset:
            raise InvalidInputError(
                f"opset {opset} is not supported: ToMe's summed merge needs opset >= {self.min_opset} "
                f"(below it a scatter drops the reduction and gives wrong results); "
                f"pass --opset between {self.min_opset} and {self.max_opset} (default {self.default_opset})"
            )
        return opset


EXPORT_SPEC = ExportSpec()
