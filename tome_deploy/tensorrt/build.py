"""ONNX file -> serialized TensorRT engine plus its sidecar, through the TensorRT Python API (no trtexec).

Networks are always built strongly typed: precision comes from the ONNX types (`tome-export --precision
fp16`), the one way that works on TensorRT 10, 11 and TensorRT-RTX alike, and the way that keeps the
merge matching in fp32 where the export put it (a builder-wide FP16 flag could lower it)."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from tome_deploy import __version__
from tome_deploy.artifact.onnx_file import load_onnx, tome_metadata
from tome_deploy.artifact.sidecar import (
    BatchProfile,
    EngineSidecar,
    file_sha256,
    sidecar_path,
)
from tome_deploy.errors import ExportError, InvalidInputError
from tome_deploy.output_files import check_outputs, write_atomically
from tome_deploy.runtime.tensorrt_backend import (
    TensorRTBackend,
    load_backend,
    local_compute_capability,
)
from tome_deploy.tensorrt.graph_check import GraphCheck, check_graph

DEFAULT_MAX_BATCH = 32
DEFAULT_OPT_BATCH = 8


class EngineBuildError(ExportError):
    """The TensorRT parser or builder failed on a graph that passed our checks."""


@dataclass(frozen=True)
class BuildOptions:
    backend: Optional[str] = None  # None: full TensorRT if importable, else TensorRT-RTX
    min_batch: Optional[int] = None
    opt_batch: Optional[int] = None
    max_batch: Optional[int] = None
    workspace_mib: Optional[int] = None
    timing_cache: Optional[Path] = None
    compute_capability: Optional[str] = None  # e.g. "89": build ahead of time (TensorRT-RTX)


@dataclass
class BuildResult:
    plan: Path
    sidecar: EngineSidecar
    seconds: float
    notes: list[str] = field(default_factory=list)


def batch_profile(input_name: str, static_batch: Optional[int], options: BuildOptions) -> BatchProfile:
    """The optimization profile: fixed for a static-batch export, else from the flags (defaults 1/8/32)."""
    given = (options.min_batch, options.opt_batch, options.max_batch)
    if static_batch is not None:
        if any(b is not None and b != static_batch for b in given):
            raise InvalidInputError(
                f"the ONNX file has a fixed batch of {static_batch}; drop --min/--opt/--max-batch or "
                "re-export without --static-batch"
            )
        return BatchProfile(input_name, static_batch, static_batch, static_batch)
    low = options.min_batch or 1
    high = options.max_batch or max(DEFAULT_MAX_BATCH, low)
    opt = options.opt_batch or min(max(DEFAULT_OPT_BATCH, low), high)
    if not 1 <= low <= opt <= high:
        raise InvalidInputError(f"need 1 <= --min-batch <= --opt-batch <= --max-batch, got {low}, {opt}, {high}")
    return BatchProfile(input_name, low, opt, high)


def target_capability(backend: TensorRTBackend, requested: Optional[str]) -> str:
    """The compute capability the engine is built for, as digits ('89')."""
    local = local_compute_capability()
    if requested is not None:
        requested = requested.lower().removeprefix("sm").replace(".", "")
    if backend.builds_ahead_of_time:
        capability = requested or local
        if capability is None:
            raise InvalidInputError(
                "no CUDA GPU is visible to build for; pass --compute-capability (e.g. 89) for an ahead-of-time build"
            )
        backend.compute_capability_enum(capability)  # offered by this TensorRT-RTX?
        return capability
    if local is None:
        raise InvalidInputError(
            "full TensorRT builds only on the GPU it targets and no CUDA GPU is visible; build on that machine, "
            "or use --backend tensorrt-rtx --compute-capability N for an ahead-of-time build"
        )
    if requested is not None and requested != local:
        raise InvalidInputError(
            f"full TensorRT builds for the local GPU (compute capability {local}), not {requested}; build on a "
            "machine with that GPU, or use --backend tensorrt-rtx"
        )
    return local


def _collecting_logger(trt, messages: list[str]):
    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, message):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                messages.append(str(message))

    return CollectingLogger()


def _first_line(messages: list[str], fallback: str) -> str:
    return messages[0].strip().splitlines()[0] if messages else fallback


def _onnx_output(model_proto) -> tuple[str, list[int]]:
    """(name, per-image shape) of the graph's first output."""
    output = model_proto.graph.output[0]
    dims = output.type.tensor_type.shape.dim[1:]
    if any(not d.HasField("dim_value") for d in dims):
        raise InvalidInputError(f"output {output.name} must have static dimensions besides the batch")
    return output.name, [d.dim_value for d in dims]


def _onnx_input(model_proto) -> tuple[str, Optional[int], list[int]]:
    """(name, static batch or None, one sample's static shape) of the graph's one input."""
    initializers = {t.name for t in model_proto.graph.initializer}
    inputs = [i for i in model_proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise InvalidInputError(f"expected one input, the ONNX graph has {[i.name for i in inputs]}")
    dims = inputs[0].type.tensor_type.shape.dim
    if len(dims) < 2 or any(not d.HasField("dim_value") for d in dims[1:]):
        raise InvalidInputError(
            f"input {inputs[0].name} must be [batch, ...] with every axis after the batch static (the input spec's shape)"
        )
    batch = dims[0].dim_value if dims[0].HasField("dim_value") else None
    return inputs[0].name, batch, [d.dim_value for d in dims[1:]]


def build_engine(
    onnx_path: str | Path,
    output: str | Path,
    options: BuildOptions = BuildOptions(),
    say: Callable[[str], None] = lambda _: None,
) -> BuildResult:
    onnx_path = Path(onnx_path)
    model_proto = load_onnx(onnx_path)
    # The timing cache is read and updated: an output, checked against the ONNX file and the engine.
    output = check_outputs(
        {"-o": output, "sidecar": sidecar_path(output), "--timing-cache": options.timing_cache}, inputs=(onnx_path,)
    )["-o"]
    metadata = tome_metadata(model_proto, onnx_path)
    input_name, static_batch, input_shape = _onnx_input(model_proto)
    output_name, output_shape = _onnx_output(model_proto)
    if metadata is not None:
        metadata.check_input(input_name, input_shape, str(onnx_path))
    profile = batch_profile(input_name, static_batch, options)
    backend = load_backend(options.backend)
    graph = check_graph(model_proto, backend)
    capability = target_capability(backend, options.compute_capability)
    notes = list(graph.warnings)
    if metadata is None:
        notes.append(f"{onnx_path.name} is not a tome-deploy export: no ToMe schedule is known for this engine")
    if options.timing_cache is not None and not backend.has_timing_cache:
        notes.append(f"{backend.name} has no timing cache (its kernels are chosen at run time); --timing-cache ignored")
    for note in notes:
        say(f"note: {note}")

    say(
        f"Building with {backend.name} {backend.version} for compute capability {capability}, "
        f"batch {profile.min}/{profile.opt}/{profile.max} ..."
    )
    start = time.perf_counter()
    plan_bytes, timing_cache = _build_serialized(backend, onnx_path, profile, capability, options, graph)
    seconds = time.perf_counter() - start
    if timing_cache is not None and options.timing_cache is not None:
        write_atomically(options.timing_cache, lambda stream: stream.write(timing_cache), flag="--timing-cache")
    sidecar = EngineSidecar(
        backend=backend.name,
        backend_version=backend.version,
        compute_capabilities=[capability],
        profiles=[profile],
        precision=metadata.precision if metadata else _graph_precision(model_proto),
        input_name=input_name,
        output_name=output_name,
        input_shape=input_shape,
        output_shape=output_shape,
        onnx_path=str(onnx_path.resolve()),
        onnx_sha256=file_sha256(onnx_path),
        plan_sha256=hashlib.sha256(plan_bytes).hexdigest(),
        plan_bytes=len(plan_bytes),
        tool_version=__version__,
        tome=metadata,
        warnings=notes,
    )
    # The sidecar first: an engine file never sits next to a sidecar that describes another build.
    write_atomically(sidecar_path(output), lambda stream: stream.write(sidecar.to_json().encode()), flag="sidecar")
    plan = write_atomically(output, lambda stream: stream.write(plan_bytes))
    return BuildResult(plan, sidecar, seconds, notes)


def _graph_precision(model_proto) -> str:
    """For a graph without ToMe metadata: the type most of its float weights have."""
    from collections import Counter

    import onnx

    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    counts = Counter(names[t.data_type] for t in model_proto.graph.initializer if t.data_type in names)
    return counts.most_common(1)[0][0] if counts else "fp32"


def _build_serialized(
    backend: TensorRTBackend,
    onnx_path: Path,
    profile: BatchProfile,
    capability: str,
    options: BuildOptions,
    graph: GraphCheck,
) -> tuple[bytes, Optional[bytes]]:
    trt = backend.trt
    if graph.needs_token_merge_plugin:
        from tome_deploy.token_merge.tensorrt_plugin import register_tensorrt_plugin

        register_tensorrt_plugin()
    messages: list[str] = []
    logger = _collecting_logger(trt, messages)
    if graph.needs_nvidia_plugins:
        trt.init_libnvinfer_plugins(logger, "")
    builder = trt.Builder(logger)
    flags = trt.NetworkDefinitionCreationFlag.__members__
    network = builder.create_network(1 << int(flags["STRONGLY_TYPED"]) if "STRONGLY_TYPED" in flags else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        detail = "; ".join(f"node {e.node_name() or e.node()}: {e.desc()}" for e in errors[:3]) or _first_line(
            messages, "unknown error"
        )
        raise EngineBuildError(f"{backend.name} {backend.version} cannot parse {onnx_path.name}: {detail}")

    config = builder.create_builder_config()
    # Layer names and their ONNX nodes stay in the engine, so profilers can attribute time to merging.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if backend.builds_ahead_of_time:
        config.num_compute_capabilities = 1
        config.set_compute_capability(backend.compute_capability_enum(capability), 0)
    timing_cache = None
    if options.timing_cache is not None and backend.has_timing_cache:
        cached = Path(options.timing_cache).read_bytes() if Path(options.timing_cache).is_file() else b""
        timing_cache = config.create_timing_cache(cached)
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    shape = list(network.get_input(0).shape)[1:]
    trt_profile = builder.create_optimization_profile()
    trt_profile.set_shape(profile.input_name, *[(batch, *shape) for batch in (profile.min, profile.opt, profile.max)])
    config.add_optimization_profile(trt_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"{backend.name} {backend.version} failed to build {onnx_path.name}: "
            f"{_first_line(messages, 'no error message')}"
        )
    cache_bytes = bytes(config.get_timing_cache().serialize()) if timing_cache is not None else None
    return bytes(serialized), cache_bytes
