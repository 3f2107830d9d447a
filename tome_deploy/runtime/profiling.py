"""Where ONNX Runtime and OpenVINO spend a ToMe model's time: matching + merging nodes vs everything else.

The exporter tags every ONNX node with the PyTorch module scope it came from; nodes under a
`TokenMerger` (`...merger`) scope are matching and merging (the keys' mean over heads included)."""

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
    def total_us(self) -> float:
        return self.merge_us + self.other_us

    @property
    def merge_share(self) -> float:
        return self.merge_us / self.total_us if self.total_us else 0.0


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
    merger_nodes = merger_node_names(onnx_path)
    # Fusions (attention, LayerNorm, GELU) rename the nodes they absorb: those count as "other".
    merge_us = other_us = 0.0
    for event in _kernel_events(onnx_path, input_name, batch_input, runs, threads):
        node = event["name"][: -len("_kernel_time")]
        if node in merger_nodes:
            merge_us += event["dur"]
        else:
            other_us += event["dur"]
    return TimeShare(merge_us, other_us)


def _kernel_events(onnx_path: str | Path, input_name: str, batch_input: np.ndarray, runs: int, threads: int | None) -> list[dict]:
    """The profiler's per-node kernel events of 1 + `runs` passes (the first is a warm-up, still profiled
    but averaged away by the callers)."""
    session = _profiled_session(onnx_path, threads)
    for _ in range(runs + 1):
        session.run(None, {input_name: batch_input})
    trace = session.end_profiling()
    try:
        events = json.loads(Path(trace).read_text())
    finally:
        os.unlink(trace)
    return [event for event in events if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")]


def _profiled_session(onnx_path: str | Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "tome_deploy_profile")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def profile_node_times(onnx_path: str | Path, input_name: str, batch_input: np.ndarray, runs: int = 5,
                       threads: int | None = None) -> list[tuple[str, str, float]]:
    """(node name, ONNX Runtime op type after its fusions, kernel microseconds per pass) of every node run."""
    per_node: dict[tuple[str, str], float] = {}
    for event in _kernel_events(onnx_path, input_name, batch_input, runs, threads):
        key = (event["name"][: -len("_kernel_time")], event.get("args", {}).get("op_name", "?"))
        per_node[key] = per_node.get(key, 0.0) + event["dur"] / (runs + 1)
    return [(node, op, us) for (node, op), us in per_node.items()]


def profile_op_types(onnx_path: str | Path, input_name: str, batch_input: np.ndarray, runs: int = 5,
                     threads: int | None = None) -> dict[str, float]:
    """Kernel microseconds per pass by ONNX Runtime op type (after its fusions), largest first."""
    per_type: dict[str, float] = {}
    for _, op, us in profile_node_times(onnx_path, input_name, batch_input, runs, threads):
        per_type[op] = per_type.get(op, 0.0) + us
    return dict(sorted(per_type.items(), key=lambda kv: -kv[1]))


# Op types that only exist after a fusion (ONNX Runtime's com.microsoft contrib ops and fused kernels).
FUSED_OP_TYPES = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "LayerNormalization", "SimplifiedLayerNormalization",
                  "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "FusedMatMul", "FusedGemm", "FusedConv", "MatMulNBits",
                  "BiasSoftmax", "NhwcConv")


def fusions_fired(onnx_path: str | Path) -> dict[str, int]:
    """{fused op type: nodes} in the graph ONNX Runtime actually runs (ORT_ENABLE_ALL, CPU), minus those the
    file already had: which of its fusions applied."""
    import onnx
    import onnxruntime as ort

    def counts(model) -> dict[str, int]:
        found: dict[str, int] = {}
        for node in model.graph.node:
            if node.op_type in FUSED_OP_TYPES:
                found[node.op_type] = found.get(node.op_type, 0) + 1
        return found

    with tempfile.TemporaryDirectory() as folder:
        optimized = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = optimized
        ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        after = counts(onnx.load(optimized))
    before = counts(onnx.load(str(onnx_path), load_external_data=False))
    return {op: n - before.get(op, 0) for op, n in after.items() if n > before.get(op, 0)}


@dataclass(frozen=True)
class OpenVINOProfile:
    op_types: dict[str, float]  # microseconds per pass by executed layer type, largest first
    share: TimeShare  # layers made only of matching + merging nodes vs every other layer


def profile_openvino(onnx_path: str | Path, input_name: str, batch_input: np.ndarray, runs: int = 5,
                     threads: int | None = None) -> OpenVINOProfile:
    """OpenVINO's per-layer counters (CPU, fp32) over `runs` passes after one warm-up. A layer counts as matching
    + merging when every ONNX node it came from (its rt_info originalLayersNames) is a merge node, or when it
    comes from no ONNX node (OpenVINO added it while reading the graph, e.g. the Broadcast its ONNX reader puts
    before a GatherND with batch_dims) and only merge layers read it."""
    from tome_deploy.runtime.openvino import OpenVINORunner

    onnx_nodes = {node.name for node in load_onnx(onnx_path).graph.node}
    runner = OpenVINORunner(onnx_path, threads=threads, profile=True)
    merge_layers = openvino_merge_layers(runner.compiled.get_runtime_model(), merger_node_names(onnx_path), onnx_nodes)
    runner.infer({input_name: batch_input})
    op_types: dict[str, float] = {}
    merge_us = other_us = 0.0
    for _ in range(runs):
        runner.infer({input_name: batch_input})
        for layer in runner.request.get_profiling_info():
            if layer.status != layer.Status.EXECUTED:
                continue
            us = layer.real_time.total_seconds() * 1e6 / runs
            op_types[layer.node_type] = op_types.get(layer.node_type, 0.0) + us
            if layer.node_name in merge_layers:
                merge_us += us
            else:
                other_us += us
    return OpenVINOProfile(dict(sorted(op_types.items(), key=lambda kv: -kv[1])), TimeShare(merge_us, other_us))


def openvino_merge_layers(runtime_model, merger_nodes: set[str], onnx_nodes: set[str]) -> set[str]:
    """Names of the compiled model's layers that do matching + merging only (see profile_openvino)."""
    ops = runtime_model.get_ordered_ops()
    origins = {}
    for op in ops:
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else op.get_friendly_name()
        origins[op.get_friendly_name()] = {name for name in names.split(",") if name}
    merge = {name for name, sources in origins.items() if sources & onnx_nodes and sources & onnx_nodes <= merger_nodes}
    for op in reversed(ops):  # readers before the layers they read
        name = op.get_friendly_name()
        readers = [target.get_node().get_friendly_name() for output in op.outputs() for target in output.get_target_inputs()]
        if not origins[name] & onnx_nodes and readers and all(reader in merge for reader in readers):
            merge.add(name)
    return merge
