"""PyTorch reference outputs in Polygraphy's JSON format, for an independent check of an ONNX file or engine:

    polygraphy run model.onnx --trt --load-inputs ref_inputs.json --load-outputs ref.json --atol 1e-4 --rtol 1e-3

Written through Polygraphy's own serialisation (`RunResults.save`, `save_json`), so the files are what its
`--load-outputs` / `--load-inputs` read."""

from __future__ import annotations

from pathlib import Path

from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.errors import MissingDependencyError
from tome_deploy.output_files import check_output_path, write_atomically
from tome_deploy.runtime.pytorch import TorchRunner
from tome_deploy.validation.probes import PROBE_KINDS, probe_inputs


def inputs_path_for(reference: str | Path) -> Path:
    """ref.json -> ref_inputs.json, next to it."""
    reference = Path(reference)
    return reference.with_name(f"{reference.stem}_inputs{reference.suffix or '.json'}")


def save_polygraphy_reference(tome_model, metadata: ToMeMetadata, path: str | Path, batch: int) -> tuple[Path, Path]:
    """One iteration per probe kind at `batch`: (outputs file, inputs file)."""
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.comparator.struct import IterationResult
        from polygraphy.json import to_json
    except ImportError as err:
        raise MissingDependencyError(
            f"--save-reference writes Polygraphy's format and needs it: pip install polygraphy ({err})"
        ) from err
    path = check_output_path(path)
    inputs_path = check_output_path(inputs_path_for(path))
    feeds = [{metadata.input.name: probe_inputs(kind, batch, metadata.input)} for kind in PROBE_KINDS]
    with TorchRunner(tome_model, metadata.input.name, metadata.output_name) as reference:
        results = RunResults(
            [("pytorch", [IterationResult(reference.infer(feed), runner_name="pytorch") for feed in feeds])]
        )
    write_atomically(path, lambda stream: stream.write(results.to_json().encode()))
    write_atomically(inputs_path, lambda stream: stream.write(to_json(feeds).encode()))
    return path, inputs_path
