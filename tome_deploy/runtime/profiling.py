"""Where ONNX Runtime spends a ToMe model's time: matching + merging nodes vs everything else.

The exporter tags every ONNX node with the PyTorch module scope it came from; nodes under a
`TokenMerger` (`...merger`) scope are matching and merging."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tome_deploy.artifact.onnx_file import load_onnx


@dataclass(frozen=True)
class TimeShare:
    merge_us: float  # kernel time of matching + merging nodes
    other_us: float  # kernel time of every other node

    @property
    def merge_share(self) -> float:
        total = self.merge_us + self.other_us
        return self.merge_us / total if total else 0.0


def merger_node_names(onnx_path: str | Path) -> set[str]:
    model = load_onnx(onnx_path)
    names = set()
    for node in model.graph.node:
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
        if ".merger" in scopes:
            names.add(node.name)
    return names


def profile_merge_share(onnx_path: str | Path, input_name: str, batch_input: np.ndarray, runs: int = 5, threads: int | None = None) -> TimeShare:
    """Profile `runs` passes at full graph optimisation, as deployed; merge nodes keep their export names."""
    import onnxruntime as ort

    merger_nodes = merger_node_names(onnx_path)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "tome_deploy_profile")
    # Fusions (attention, LayerNorm, GELU) rename the nodes they absorb: those count as "other".
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    session.run(None, {input_name: batch_input})  # warm-up, still profiled but averaged away below
    for _ in range(runs):
        session.run(None, {input_name: batch_input})
    trace = session.end_profiling()
    try:
        events = json.loads(Path(trace).read_text())
    finally:
        os.unlink(trace)
    merge_us = other_us = 0.0
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        node = event["name"][: -len("_kernel_time")]
        if node in merger_nodes:
            merge_us += event["dur"]
        else:
            other_us += event["dur"]
    return TimeShare(merge_us, other_us)
