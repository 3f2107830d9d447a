"""Where ONNX Runtime and OpenVINO spend a ToMe model's time: matching + merging nodes vs everything else.

The exporter tags every ONNX node with the PyTorch module scope it came from; nodes under a
`TokenMerger` (`...merger`) scope are matching and merging (the keys' mean over heads included).
Models profiled together run interleaved, pass by pass, so that a machine that speeds up or slows down
over minutes (shared CPUs) hits them alike, as in runtime/throughput.py."""

from __future__ import annotations

import contextlib
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


@dataclass(frozen=True)
class LayerTime:
    name: str  # ONNX Runtime node or OpenVINO layer
    op_type: str  # after the runtime's fusions
    us: float  # per pass
    merge: bool  # matching + merging only


@dataclass(frozen=True)
class Profile:
    layers: list[LayerTime]

    @property
    def share(self) -> TimeShare:
        merge = sum(layer.us for layer in self.layers if layer.merge)
        return TimeShare(merge, sum(layer.us for layer in self.layers) - merge)

    def op_types(self, merge_only: bool = False) -> dict[str, tuple[int, float]]:
        """{op type: (layers, microseconds per pass)}, largest first."""
        found: dict[str, tuple[int, float]] = {}
        for layer in self.layers:
            if layer.merge or not merge_only:
                count, us = found.get(layer.op_type, (0, 0.0))
                found[layer.op_type] = (count + 1, us + layer.us)
        return dict(sorted(found.items(), key=lambda kv: -kv[1][1]))


def merger_node_names(onnx_path: str | Path) -> set[str]:
    model = load_onnx(onnx_path)
    names = set()
    for node in model.graph.node:
        scopes = {p.key: p.value for p in node.metadata_props}.get("pkg.torch.onnx.name_scopes", "")
        if ".merger" in scopes:
            names.add(node.name)
    return names


def profile_side_by_side(
    runtime: str,
    models: dict[str, str | Path],
    input_name: str,
    batch_input: np.ndarray,
    runs: int = 5,
    threads: int | None = None,
) -> dict[str, Profile]:
    """Per-node time of each model over `runs` passes, the models taking turns pass by pass: ONNX Runtime's
    profiler (full graph optimisation, as deployed; merge nodes keep their export names) or OpenVINO's
    per-layer counters (CPU, fp32)."""
    if runtime == "openvino":
        return _openvino_profiles(models, input_name, batch_input, runs, threads)
    return _onnxruntime_profiles(models, input_name, batch_input, runs, threads)


def _onnxruntime_profiles(models, input_name, batch_input, runs, threads) -> dict[str, Profile]:
    sessions = {label: _profiled_session(path, threads) for label, path in models.items()}
    for _ in range(runs + 1):  # the first pass is a warm-up, still profiled but averaged away
        for session in sessions.values():
            session.run(None, {input_name: batch_input})
    profiles = {}
    for label, session in sessions.items():
        trace = session.end_profiling()
        try:
            events = json.loads(Path(trace).read_text())
        finally:
            os.unlink(trace)
        merger_nodes = merger_node_names(models[label])
        per_node: dict[tuple[str, str], float] = {}
        for event in events:
            if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
                key = (event["name"][: -len("_kernel_time")], event.get("args", {}).get("op_name", "?"))
                per_node[key] = per_node.get(key, 0.0) + event["dur"] / (runs + 1)
        # Fusions (attention, LayerNorm, GELU) rename the nodes they absorb: those count as "other".
        profiles[label] = Profile(
            [LayerTime(node, op, us, node in merger_nodes) for (node, op), us in per_node.items()]
        )
    return profiles


def _profiled_session(onnx_path: str | Path, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.gettempdir(), "tome_deploy_profile")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def _openvino_profiles(models, input_name, batch_input, runs, threads) -> dict[str, Profile]:
    """A layer counts as matching + merging when every ONNX node it came from (its rt_info originalLayersNames)
    is a merge node, or when it comes from no ONNX node (OpenVINO added it while reading the graph, e.g. the
    Broadcast its ONNX reader puts before a GatherND with batch_dims) and only merge layers read it."""
    from tome_deploy.runtime.openvino import OpenVINORunner

    with contextlib.ExitStack() as active:
        runners, merge_layers = {}, {}
        for label, path in models.items():
            runners[label] = active.enter_context(OpenVINORunner(path, threads=threads, profile=True))
            onnx_nodes = {node.name for node in load_onnx(path).graph.node}
            merge_layers[label] = openvino_merge_layers(
                runners[label].compiled.get_runtime_model(), merger_node_names(path), onnx_nodes
            )
        totals: dict[str, dict[tuple[str, str], float]] = {label: {} for label in models}
        for index in range(runs + 1):
            for label, runner in runners.items():
                runner.infer({input_name: batch_input})
                if index == 0:
                    continue  # warm-up
                for layer in runner.request.get_profiling_info():
                    if layer.status == layer.Status.EXECUTED:
                        key = (layer.node_name, layer.node_type)
                        totals[label][key] = totals[label].get(key, 0.0) + layer.real_time.total_seconds() * 1e6 / runs
    return {
        label: Profile([LayerTime(name, op, us, name in merge_layers[label]) for (name, op), us in found.items()])
        for label, found in totals.items()
    }


def openvino_merge_layers(runtime_model, merger_nodes: set[str], onnx_nodes: set[str]) -> set[str]:
    """Names of the compiled model's layers that do matching + merging only (see _openvino_profiles)."""
    ops = runtime_model.get_ordered_ops()
    origins = {}
    for op in ops:
        info = op.get_rt_info()
        names = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else op.get_friendly_name()
        origins[op.get_friendly_name()] = {name for name in names.split(",") if name}
    merge = {name for name, sources in origins.items() if sources & onnx_nodes and sources & onnx_nodes <= merger_nodes}
    for op in reversed(ops):  # readers before the layers they read
        name = op.get_friendly_name()
        readers = [
            target.get_node().get_friendly_name() for output in op.outputs() for target in output.get_target_inputs()
        ]
        if not origins[name] & onnx_nodes and readers and all(reader in merge for reader in readers):
            merge.add(name)
    return merge


# Op types that only exist after a fusion (ONNX Runtime's com.microsoft contrib ops and fused kernels).
FUSED_OP_TYPES = (
    "Attention",
    "MultiHeadAttention",
    "SkipLayerNormalization",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "Gelu",
    "FastGelu",
    "BiasGelu",
    "QuickGelu",
    "FusedMatMul",
    "FusedGemm",
    "FusedConv",
    "MatMulNBits",
    "BiasSoftmax",
    "NhwcConv",
)


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
