"""Parity of an exported ONNX file with the patched PyTorch model it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .compare import VERDICT_HEADER, OutputVerdict, compare_output
from .probes import PROBE_KINDS, probe_images
from .runners import OnnxRuntimeRunner, TorchRunner
from .spec import EXPORT_SPEC, ExportSpec, ToMeMetadata


@dataclass
class ValidationReport:
    onnx_path: str
    verdicts: list[OutputVerdict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.verdicts) and all(v.passed for v in self.verdicts)

    def table(self) -> str:
        return "\n".join([VERDICT_HEADER] + [v.line() for v in self.verdicts])

    def to_dict(self) -> dict:
        return {"onnx": self.onnx_path, "passed": self.passed, "checks": [v.to_dict() for v in self.verdicts]}


def default_batch_sizes(metadata: ToMeMetadata) -> list[int]:
    """The exported batch, and for a dynamic batch also 1 and one more that was never traced."""
    if metadata.batch != "dynamic":
        return [int(metadata.batch)]
    example = int(metadata.extra.get("example_batch", 2))
    return sorted({example, 1, 3})


def validate_onnx(
    tome_model,
    onnx_path: str | Path,
    metadata: ToMeMetadata,
    *,
    batch_sizes: Sequence[int] | None = None,
    probes: Iterable[str] = PROBE_KINDS,
    atol: float | None = None,
    rtol: float | None = None,
    spec: ExportSpec = EXPORT_SPEC,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> ValidationReport:
    """Run both on each probe kind at each batch size; one verdict per (probe, batch, output)."""
    reference = TorchRunner(tome_model, metadata.input_name, metadata.output_name)
    candidate = OnnxRuntimeRunner(onnx_path, providers=providers)
    report = ValidationReport(str(onnx_path))
    for kind in probes:
        for batch in batch_sizes or default_batch_sizes(metadata):
            feed = {metadata.input_name: probe_images(kind, batch, metadata)}
            expected, got = reference.infer(feed), candidate.infer(feed)
            for name, value in expected.items():
                report.verdicts.append(
                    compare_output(
                        value,
                        got[name],
                        probe=kind,
                        output=name,
                        atol=spec.atol if atol is None else atol,
                        rtol=spec.rtol if rtol is None else rtol,
                        min_cosine=spec.min_cosine,
                    )
                )
    return report
