"""The one declarative export spec, read by both the exporter and the validator so they cannot disagree:
tensor names, opsets, targets and their default merge formulation, precisions and parity tolerances. Imports no torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tome_deploy.errors import InvalidInputError

# Where the export will run, and the merge formulation (artifact/formulations.py) an export for it uses
# unless --merge says otherwise. tensorrt: a merge formulation TensorRT and TensorRT-RTX parse natively.
TARGETS: tuple[str, ...] = ("onnxruntime", "tensorrt")
TARGET_DEFAULT_MERGE = {"onnxruntime": "scatter", "tensorrt": "matmul"}
# fp16: weights and activations in fp16, inputs/outputs fp32; matching and log(size) stay fp32.
# bf16: an OpenVINO IR whose attention and MLP MatMuls compute in bf16, everything else (the matching
# subgraph, log(size), norms, softmax, the residual stream) in f32 (docs/design.md#precision).
# int8: the attention and MLP MatMuls quantized by the runtime's own tool; every TokenMerger node stays f32.
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8")
# The CPU runtimes an export of each precision is made for and validated in (--runtime).
PRECISION_RUNTIMES: dict[str, tuple[str, ...]] = {
    "fp32": ("onnxruntime", "openvino"),
    "fp16": ("onnxruntime", "openvino"),
    "bf16": ("openvino",),
    "int8": ("onnxruntime", "openvino"),
}
# Precisions whose logits are not expected to match fp32 closely: validated by agreement (AgreementBudget).
REDUCED_PRECISIONS: tuple[str, ...] = ("bf16", "int8")
OPENVINO_IR_SUFFIX = ".xml"  # an OpenVINO IR: the graph; its weights sit next to it as .bin
# What tome-tune measures candidates in (fp16 targets TensorRT, which tome-tune does not measure).
TUNE_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")


def artifact_suffix(precision: str, runtime: str) -> str:
    """The file an export of `precision` for `runtime` is: an OpenVINO IR for OpenVINO's bf16 and int8, else ONNX."""
    return OPENVINO_IR_SUFFIX if runtime == "openvino" and precision in REDUCED_PRECISIONS else ".onnx"


# An export too large for one file keeps its weights in the graph's name plus this: out.onnx -> out.onnx.data.
EXTERNAL_DATA_SUFFIX = ".data"


@dataclass(frozen=True)
class Tolerance:
    """One parity budget: |diff| <= atol + rtol * |ref| everywhere and cosine >= min_cosine."""

    atol: float
    rtol: float
    min_cosine: float


@dataclass(frozen=True)
class AgreementBudget:
    """The parity budget of a reduced-precision export against the fp32 ToMe model, per probe: cosine of the
    logits >= min_cosine and merge agreement (the share of blocks x images whose selected sources and
    destinations all equal fp32's) >= min_merge_agreement. Top-1/top-5 agreement are reported, not bounded:
    on a few probe images one flipped near-tie is a large share. Merge agreement is bounded at 0 by default
    (reported only): on random weights and probe images most scores are near-ties, and one changed pair
    changes every later block's tokens, so it says more on real data (docs/design.md#precision)."""

    min_cosine: float
    min_merge_agreement: float


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
    # Reduced precision vs the fp32 ToMe model in PyTorch (docs/design.md#precision has the measurements).
    bf16: AgreementBudget = AgreementBudget(min_cosine=0.99, min_merge_agreement=0.0)
    int8: AgreementBudget = AgreementBudget(min_cosine=0.95, min_merge_agreement=0.0)

    def tolerance(self, precision: str) -> Tolerance:
        return self.fp16 if precision == "fp16" else self.fp32

    def agreement_budget(self, precision: str) -> AgreementBudget:
        """The budget of a reduced precision (REDUCED_PRECISIONS)."""
        return self.bf16 if precision == "bf16" else self.int8

    def check_batch(self, batch: int, flag: str = "--batch-size") -> int:
        if not 1 <= batch <= self.max_batch:
            raise InvalidInputError(
                f"{flag} must be from 1 to {self.max_batch}, got {batch}; pass a batch size in that range"
            )
        return batch

    def check_precision(self, precision: str, runtime: str, output: str | Path, target: str = "onnxruntime") -> str:
        """Refuse a precision the runtime, the output's format or the target cannot hold, naming the fix:
        bf16 runs in OpenVINO only and is written as an IR; an IR (-o NAME.xml) is for --runtime openvino."""
        if precision not in PRECISIONS:
            raise InvalidInputError(f"unknown --precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        if precision in REDUCED_PRECISIONS and target != "onnxruntime":
            raise InvalidInputError(
                f"--precision {precision} is for CPU runtimes; a --target {target} export takes fp32 or fp16"
            )
        is_ir = Path(output).suffix.lower() == OPENVINO_IR_SUFFIX
        if runtime not in PRECISION_RUNTIMES[precision]:
            raise InvalidInputError(
                f"--precision {precision} runs in OpenVINO, not {runtime}: pass --runtime openvino -o NAME.xml"
            )
        if is_ir and runtime != "openvino":
            raise InvalidInputError(f"-o {output} writes an OpenVINO IR, which OpenVINO runs: add --runtime openvino")
        if runtime == "openvino" and precision in REDUCED_PRECISIONS and not is_ir:
            raise InvalidInputError(
                f"--precision {precision} for OpenVINO is written as an OpenVINO IR: pass -o NAME.xml (not {output})"
            )
        return precision

    def check_opset(self, opset: int) -> int:
        if not self.min_opset <= opset <= self.max_opset:
            raise InvalidInputError(
                f"opset {opset} is not supported: ToMe's summed merge needs opset >= {self.min_opset} "
                f"(below it a scatter drops the reduction and gives wrong results); "
                f"pass --opset between {self.min_opset} and {self.max_opset} (default {self.default_opset})"
            )
        return opset


EXPORT_SPEC = ExportSpec()
