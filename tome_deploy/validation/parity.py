"""Parity of an exported ONNX file with the patched PyTorch model it came from."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from tome_deploy.artifact.matching import MatchTensors
from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.spec import EXPORT_SPEC, REDUCED_PRECISIONS, ExportSpec
from tome_deploy.runtime.base import Runner
from tome_deploy.runtime.factory import open_runner
from tome_deploy.runtime.pytorch import TorchRunner
from tome_deploy.validation.compare import (
    AGREEMENT_HEADER,
    VERDICT_HEADER,
    OutputVerdict,
    check_tolerances,
    compare_output,
    judge_agreement,
)
from tome_deploy.validation.merge_agreement import merge_agreement, recording_matches, runtime_matches
from tome_deploy.validation.probes import PROBE_KINDS, probe_inputs, probe_label


@dataclass
class ValidationReport:
    onnx_path: str
    verdicts: list[OutputVerdict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.verdicts) and all(v.passed for v in self.verdicts)

    def table(self) -> str:
        runners = list(dict.fromkeys(v.runner for v in self.verdicts))
        header = AGREEMENT_HEADER if any(v.merge_agreement is not None for v in self.verdicts) else VERDICT_HEADER
        if len(runners) <= 1:
            return "\n".join([header] + [v.line() for v in self.verdicts])
        sections = []
        for runner in runners:
            sections += [f"PyTorch vs {runner}:", header] + [v.line() for v in self.verdicts if v.runner == runner]
        return "\n".join(sections)

    def to_dict(self) -> dict:
        return {"onnx": self.onnx_path, "passed": self.passed, "checks": [v.to_dict() for v in self.verdicts]}


def default_batch_sizes(metadata: ToMeMetadata) -> list[int]:
    """The exported batch, and for a dynamic batch also 1 and one more that was never traced."""
    if metadata.batch is not None:
        return [metadata.batch]
    return sorted({metadata.example_batch, 1, 3})


def validate_onnx(
    tome_model,
    onnx_path: str | Path,
    metadata: ToMeMetadata,
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    **options,
) -> ValidationReport:
    """PyTorch vs ONNX Runtime; `options` as for validate_runners."""
    return validate_runners(
        tome_model, [open_runner(onnx_path, providers=providers)], metadata, str(onnx_path), **options
    )


def validate_runners(
    tome_model,
    candidates: Sequence[Runner],
    metadata: ToMeMetadata,
    artifact: str,
    *,
    batch_sizes: Sequence[int] | None = None,
    probes: Iterable[str] = PROBE_KINDS,
    atol: float | None = None,
    rtol: float | None = None,
    spec: ExportSpec = EXPORT_SPEC,
    match_outputs: Sequence[MatchTensors] | None = None,
) -> ValidationReport:
    """Run the reference and each candidate on each probe kind (validation/probes.py, for the input's kind) at
    each batch size; one verdict per
    (candidate, probe, batch, output), within the budget of the export's precision. Candidates not active
    yet are activated for the comparison and deactivated after it; active ones stay active.

    A reduced precision (bf16, int8) is judged by its agreement with the fp32 `tome_model`
    (spec.agreement_budget): cosine and merge agreement, for which every candidate is a match twin
    (validation/merge_agreement.py) whose extra outputs are `match_outputs`."""
    check_tolerances(atol, rtol)
    report = ValidationReport(artifact)
    tolerance = spec.tolerance(metadata.precision)
    reduced = metadata.precision in REDUCED_PRECISIONS
    if reduced and match_outputs is None:
        raise ValueError("a reduced-precision export is validated on its match twin: pass match_outputs")
    twin_outputs = list(match_outputs or ())
    with contextlib.ExitStack() as activated:
        recorded = activated.enter_context(recording_matches(tome_model))
        reference = activated.enter_context(TorchRunner(tome_model, metadata.input.name, metadata.output_name))
        for candidate in candidates:
            if not candidate.is_active:
                activated.enter_context(candidate)
        for kind in probes:
            for batch in batch_sizes or default_batch_sizes(metadata):
                feed = {metadata.input.name: probe_inputs(kind, batch, metadata.input)}
                expected = reference.infer(feed)
                expected_matches = dict(recorded)
                for candidate in candidates:
                    got = candidate.infer(feed)
                    for name, value in expected.items():
                        verdict = compare_output(
                            value,
                            got[name],
                            probe=probe_label(kind, metadata.input),
                            output=name,
                            atol=tolerance.atol if atol is None else atol,
                            rtol=tolerance.rtol if rtol is None else rtol,
                            min_cosine=tolerance.min_cosine,
                        )
                        if reduced:
                            budget = spec.agreement_budget(metadata.precision)
                            agreement = merge_agreement(expected_matches, runtime_matches(got, twin_outputs))
                            verdict = judge_agreement(verdict, agreement, budget.min_cosine, budget.min_merge_agreement)
                        report.verdicts.append(replace(verdict, runner=candidate.name))
    return report
