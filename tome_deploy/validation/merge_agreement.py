"""Merge-choice agreement: how often an export picks the same merges as the fp32 ToMe model in PyTorch.

A block's choice on one image is its set of (source, destination) pairs: which A' tokens merge away and the
B' token each merges into. The agreement is the share of blocks x images whose sets are equal.

The exported file does not output its choices, so validation runs its **match twin**: the same graph
(same nodes, weights and precision) with each merging block's choice tensors added as graph outputs
(`match_twin`). A graph output changes nothing that is computed; the twin's logits are compared as the
artifact's. The PyTorch side records the same choices with forward hooks on each TokenMerger
(`recording_matches`). (docs/design.md#precision)"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from tome_deploy.artifact.matching import MatchTensors, match_tensors
from tome_deploy.artifact.onnx_file import load_onnx
from tome_deploy.artifact.spec import OPENVINO_IR_SUFFIX
from tome_deploy.errors import InvalidInputError

# block -> (sources [B, r], destinations [B, r]) as index arrays
Matches = dict[int, tuple[np.ndarray, np.ndarray]]
_MERGER_MODULE = re.compile(r"layers\.(\d+)\.merger$")


def match_twin(artifact: str | Path, folder: Path) -> tuple[Path, list[MatchTensors]]:
    """The match twin of an ONNX file or OpenVINO IR, written in `folder`, and its choice tensors."""
    if Path(artifact).suffix.lower() == OPENVINO_IR_SUFFIX:
        return _ir_twin(Path(artifact), folder)
    return _onnx_twin(Path(artifact), folder)


def _onnx_twin(path: Path, folder: Path) -> tuple[Path, list[MatchTensors]]:
    import onnx

    model = load_onnx(path)
    tensors = match_tensors(model)
    for match in tensors:
        for name in (match.source, match.destination):
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None))
    twin = folder / "match_twin.onnx"
    onnx.save(model, str(twin))
    return twin, tensors


def _ir_twin(path: Path, folder: Path) -> tuple[Path, list[MatchTensors]]:
    """An IR carries no module scopes; its choices are its GatherElements nodes, one per merging block in
    graph order (a ToMe graph has no other), the index input being the sources."""
    import openvino as ov

    model = ov.Core().read_model(str(path))
    gathers = [node for node in model.get_ordered_ops() if node.get_type_name() == "GatherElements"]
    tensors = []
    for block, gather in enumerate(gathers):
        source, destination = gather.input_value(1), gather.output(0)
        model.add_outputs([source, destination])
        tensors.append(MatchTensors(block, source.get_any_name(), destination.get_any_name()))
    twin = folder / "match_twin.xml"
    ov.save_model(model, str(twin), compress_to_fp16=False)
    return twin, tensors


def runtime_matches(outputs: Mapping[str, np.ndarray], tensors: list[MatchTensors]) -> Matches:
    """A twin's choices from its outputs, numbered 0.. in block order (the merging blocks only)."""
    return {
        index: (outputs[match.source][..., 0], outputs[match.destination][..., 0])
        for index, match in enumerate(tensors)
    }


@contextlib.contextmanager
def recording_matches(model: Any) -> Iterator[Matches]:
    """While open, every forward of `model` stores each merging block's choice in the yielded dict
    (overwritten by the next forward), numbered 0.. in block order. A TokenMerger's forward returns its
    Match last; the hooks read its source_a and destination_b ([B, r, 1] each)."""
    mergers = sorted(
        (
            (int(found.group(1)), module)
            for name, module in model.named_modules()
            if (found := _MERGER_MODULE.search(name))
        ),
        key=lambda pair: pair[0],
    )
    recorded: Matches = {}
    handles = []
    for index, (_, merger) in enumerate(mergers):

        def hook(_module, _inputs, output, index=index):
            match = output[-1]
            recorded[index] = (
                match.source_a[..., 0].detach().numpy(),  # [B, r]
                match.destination_b[..., 0].detach().numpy(),  # [B, r]
            )

        handles.append(merger.register_forward_hook(hook))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def merge_agreement(reference: Matches, candidate: Matches) -> float:
    """Share of blocks x images whose (source, destination) pair sets are equal; 1.0 with no merging block.
    InvalidInputError when the two disagree on which blocks merge or how many tokens."""
    if set(reference) != set(candidate):
        raise InvalidInputError(
            f"the export merges in {len(candidate)} blocks, the PyTorch model in {len(reference)}; re-export it"
        )
    equal = total = 0
    for block, (ref_source, ref_destination) in reference.items():
        got_source, got_destination = candidate[block]
        if got_source.shape != ref_source.shape:
            raise InvalidInputError(
                f"block {block} of the export merges {got_source.shape} tokens, PyTorch {ref_source.shape}; re-export it"
            )
        for image in range(ref_source.shape[0]):
            ref_pairs = set(zip(ref_source[image].tolist(), ref_destination[image].tolist()))
            got_pairs = set(zip(got_source[image].tolist(), got_destination[image].tolist()))
            equal += ref_pairs == got_pairs
            total += 1
    return equal / total if total else 1.0
