"""OpenVINO (CPU) behind the runner lifecycle (runtime/base.py): reads the ONNX file directly, or an IR (.xml) written from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from tome_deploy.artifact.spec import OPENVINO_IR_SUFFIX
from tome_deploy.errors import InvalidInputError, MissingDependencyError
from tome_deploy.output_files import StagedOutput, companion_path
from tome_deploy.runtime.base import Runner
from tome_deploy.token_merge.contract import OP_DOMAIN, OP_TYPE, graph_has_token_merge

IR_WEIGHTS_SUFFIX = ".bin"  # an IR's weights, next to its .xml
OPENVINO_EXTRA = "pip install 'tome-deploy[openvino]' (or pip install openvino)"


def import_openvino():
    try:
        import openvino
    except ImportError as err:
        raise MissingDependencyError(
            f"--runtime openvino needs OpenVINO, which is not installed: {OPENVINO_EXTRA}"
        ) from err
    return openvino


def check_runs_in_openvino(path: str | Path) -> None:
    """OpenVINO has no tome::TokenMerge kernel: refuse --merge plugin graphs with the fix."""
    if Path(path).suffix.lower() != ".onnx":
        return
    import onnx

    if graph_has_token_merge(onnx.load(str(path), load_external_data=False)):
        raise InvalidInputError(
            f"{path} holds {OP_DOMAIN}::{OP_TYPE} nodes (--merge plugin), which OpenVINO cannot run (no such op); "
            "export with --merge scatter or --merge matmul for OpenVINO"
        )


class OpenVINORunner(Runner):
    """OpenVINO on CPU at inference precision f32, which runs a file in the precision its element types say:
    f32 for an fp32 export, bf16 in the MatMuls of a bf16 IR (runtime/openvino_bf16.py), whose matching stays
    f32. OpenVINO's own default would lower every f32 node to bf16 on CPUs with AMX/AVX512-BF16, which
    changes merge choices. profile=True turns on OpenVINO's per-layer counters
    (`request.get_profiling_info()`). A --merge plugin graph is refused at construction."""

    name = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None, device: str = "CPU", profile: bool = False):
        super().__init__()
        check_runs_in_openvino(path)
        self.path, self.threads, self.device, self.profile = path, threads, device, profile
        self.compiled: Any = None  # openvino.CompiledModel while active
        self.request: Any = None  # its InferRequest
        self.input_names: list[str] = []
        self.output_names: list[str] = []

    def _load(self) -> None:
        ov = import_openvino()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
        if self.profile:
            config["PERF_COUNT"] = "YES"
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(str(self.path)), self.device, config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]

    def _run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.request.infer({name: np.ascontiguousarray(feed[name]) for name in self.input_names})
        return {name: np.array(results[port]) for name, port in zip(self.output_names, self.compiled.outputs)}

    def _release(self) -> None:
        self.request = None
        self.compiled = None


RT_INFO_SECTION = "tome_deploy"  # the IR's rt_info section that holds the ONNX file's tome.* metadata


def write_ir(onnx_path: str | Path, xml_path: str | Path, precision: str = "fp32") -> Path:
    """Convert a tome-deploy ONNX file to an OpenVINO IR written at xml_path (and its .bin next to it),
    f32 weights, with the ToMe metadata (the ONNX file's tome.* properties, JSON values; tome.precision
    set to `precision`) under rt_info[RT_INFO_SECTION]. precision bf16: its transformer MatMuls compute in bf16 and its matching
    nodes stay f32 (runtime/openvino_bf16.py). Writes the two files directly: save_ir is the atomic form."""
    from tome_deploy.artifact.matching import matching_nodes
    from tome_deploy.artifact.onnx_file import load_onnx, tome_metadata

    check_runs_in_openvino(onnx_path)
    ov = import_openvino()
    xml_path = Path(xml_path)
    if xml_path.suffix != OPENVINO_IR_SUFFIX:
        raise InvalidInputError(f"an OpenVINO IR path ends in .xml (the weights go next to it as .bin), got {xml_path}")
    model_proto = load_onnx(onnx_path)
    model = ov.Core().read_model(str(onnx_path))
    metadata = tome_metadata(model_proto, onnx_path)
    props = {prop.key: prop.value for prop in model_proto.metadata_props}
    if metadata is not None:  # the IR records its own precision
        props.update(dataclasses.replace(metadata, precision=precision).to_props())
    for key, value in props.items():
        model.set_rt_info(value, [RT_INFO_SECTION, key])
    precise: set[str] = set()
    if precision == "bf16":
        from tome_deploy.runtime.openvino_bf16 import bf16_model

        precise = bf16_model(model, matching_nodes(model_proto))
    ov.save_model(model, str(xml_path), compress_to_fp16=False)
    if precise:
        from tome_deploy.runtime.openvino_bf16 import mark_precise

        mark_precise(xml_path, precise)
    return xml_path


def save_ir(onnx_path: str | Path, xml_path: str | Path, precision: str = "fp32") -> Path:
    """write_ir, atomically: both files appear together or not at all (an existing IR there is kept on failure)."""
    with StagedOutput(xml_path, companions=[companion_path(Path(xml_path), IR_WEIGHTS_SUFFIX)]) as staged:
        write_ir(onnx_path, staged.temp, precision)
        return staged.commit()


def read_ir_metadata(xml_path: str | Path) -> dict[str, str]:
    """The tome.* properties save_ir stored in an IR's rt_info ({} when there are none)."""
    ov = import_openvino()
    model = ov.Core().read_model(str(xml_path))
    if not model.has_rt_info([RT_INFO_SECTION]):
        return {}
    section = model.get_rt_info()[RT_INFO_SECTION]
    return {key: section[key].astype(str) for key in section}
