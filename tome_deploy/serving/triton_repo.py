"""A Triton Inference Server model repository for one artifact: DIR/<model>/config.pbtxt and DIR/<model>/1/model.*.

An ONNX file whose weights are in an external-data file (an export over 2 GiB, or --external-data) is
copied as 1/model.onnx with that file next to it under the name the graph gives it (1/<export>.onnx.data):
Triton's ONNX Runtime backend and the Python-backend model open 1/model.onnx by path and find it there.

The config is written as protobuf text (Triton's `inference.ModelConfig`); its fields come from the
artifact: platform, tensors, batch (a dynamic-batch export -> max_batch_size + dynamic_batching; a
fixed-batch export -> max_batch_size 0 with the batch inside dims) and the ToMe schedule as parameters.
Two model kinds: Triton's own backends (`platform: onnxruntime_onnx` / `tensorrt_plan`, the default, for
GPU Triton images; `backend: "openvino"` for an OpenVINO IR, its .bin copied along) or `backend: "python"`, which runs the ONNX file through tome-deploy's ONNX Runtime
runner inside Triton's Python backend (`serving/triton_python.py`; model.py is written next to the file).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from tome_deploy.artifact.formulations import all_formulations, either, formulation_named
from tome_deploy.errors import InvalidInputError
from tome_deploy.output_files import current_umask, forget, temporary_folder, write_atomically
from tome_deploy.serving.kserve import TensorSpec
from tome_deploy.serving.served_model import ServedModel
from tome_deploy.serving.triton_python import MODEL_PY, THREADS_PARAMETER

MODEL_FILE = {"onnx": "model.onnx", "engine": "model.plan", "openvino_ir": "model.xml"}
# Files an artifact brings along, by kind: suffix next to it -> name in the version folder.
COMPANION_FILES = {"openvino_ir": {".bin": "model.bin"}}
# Triton's OpenVINO backend passes these to OpenVINO when compiling: f32 inference precision runs an IR in
# the precision its types say (a bf16 IR's MatMuls in bf16, its matching in f32), as tome-serve does.
OPENVINO_PARAMETERS = {"INFERENCE_PRECISION_HINT": "f32"}
VERSION = "1"
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")
MAX_NAME = 128  # a model name is a folder name (with room for the staging folder's prefix and suffix) and a URL part
MAX_INT32 = 2**31 - 1  # Triton's max_batch_size and instance_group count are int32: larger cannot be parsed
BACKENDS = ("platform", "python")  # Triton's ONNX Runtime / TensorRT backend, or ours inside its Python backend
# The ToMe facts a Triton user may want to see next to the model (Triton parameters are strings).
TOME_PARAMETERS = (
    "model",
    "schedule",
    "r_effective",
    "tokens_per_layer",
    "num_prefix_tokens",
    "theoretical_speedup",
    "merge",
    "precision",
    "input",
)


class ProtoEnumValue(str):
    """A protobuf-text enum value (KIND_GPU, TYPE_FP32): written bare, not quoted like other strings."""


def check_model_name(name: str) -> None:
    """A model name is one folder name and one URL part: 1 to MAX_NAME letters, digits, '_', '.' and '-'."""
    if len(name) > MAX_NAME or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in (".", ".."):
        shown = repr(name) if len(name) <= 40 else f"{name[:40]!r}... ({len(name)} characters)"
        raise InvalidInputError(
            f"model name {shown} is not a valid directory name; pass --name with 1 to {MAX_NAME} letters, digits, '_', '.' and '-' "
            "(not '.' or '..')"
        )


def check_count(flag: str, value: Optional[int]) -> None:
    """A count Triton reads as an int32 (max_batch_size, instance_group count): 1 to 2**31 - 1."""
    if value is not None and not 1 <= value <= MAX_INT32:
        raise InvalidInputError(
            f"{flag} must be >= 1 and at most {MAX_INT32} (an int32 in Triton's config), got {value}; pass a value in that range"
        )


@dataclass(frozen=True)
class TritonOptions:
    model_name: str
    max_batch: Optional[int] = None  # dynamic batch: default 8 for ONNX, the profile maximum for engines
    max_queue_delay_us: int = 5000
    instances: int = 1
    kind: str = "KIND_CPU"
    backend: str = "platform"
    threads: Optional[int] = None  # python backend: ONNX Runtime intra-op threads per instance (None: all cores)

    def __post_init__(self):
        check_model_name(self.model_name)
        for flag, value in (("--max-batch", self.max_batch), ("--instances", self.instances)):
            check_count(flag, value)
        if self.max_queue_delay_us < 0:
            raise InvalidInputError("--max-delay-ms must be >= 0; pass a valid value")
        if self.kind not in INSTANCE_KINDS:
            raise InvalidInputError(f"instance kind {self.kind!r} is not one of {INSTANCE_KINDS}")
        if self.backend not in BACKENDS:
            raise InvalidInputError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.threads is not None and (self.backend != "python" or self.threads < 1):
            raise InvalidInputError(
                "--threads applies to --backend python and must be >= 1; drop it or pass --backend python"
            )


@dataclass(frozen=True)
class TritonRepo:
    root: Path
    model_dir: Path
    config_path: Path
    model_path: Path
    command: str


def model_config(served_model: ServedModel, options: TritonOptions) -> dict[str, Any]:
    """The ModelConfig message as a dict (field name -> value; lists of dicts are repeated messages)."""
    check_triton_can_run(served_model, options.backend)
    fixed = served_model.fixed_batch
    runs_on = {"backend": "python"} if options.backend == "python" else served_model.triton_runs_on
    config: dict[str, Any] = {
        "name": options.model_name,
        **runs_on,
        "max_batch_size": 0 if fixed is not None else triton_max_batch(served_model, options.max_batch),
        "input": [_tensor(spec, fixed) for spec in served_model.inputs],
        "output": [_tensor(spec, fixed) for spec in served_model.outputs],
    }
    if fixed is None:  # Triton batches only models whose batch axis is free
        config["dynamic_batching"] = {"max_queue_delay_microseconds": options.max_queue_delay_us}
    kind = "KIND_GPU" if served_model.kind == "engine" else options.kind
    config["instance_group"] = [{"count": options.instances, "kind": ProtoEnumValue(kind)}]
    meta = served_model.metadata.to_dict()
    config["parameters"] = [
        {"key": f"tome.{name}", "value": {"string_value": _parameter_text(meta[name])}} for name in TOME_PARAMETERS
    ]
    if "quality" in meta:  # recorded by tome-export --schedule-from
        config["parameters"].append({"key": "tome.quality", "value": {"string_value": json.dumps(meta["quality"])}})
    if served_model.kind == "openvino_ir":
        config["parameters"] += [{"key": k, "value": {"string_value": v}} for k, v in OPENVINO_PARAMETERS.items()]
    if options.threads is not None:
        config["parameters"].append({"key": THREADS_PARAMETER, "value": {"string_value": str(options.threads)}})
    return config


def check_triton_can_run(served_model: ServedModel, backend: str = "platform") -> None:
    """Triton's ONNX Runtime backend knows no custom op (the plugin formulation's tome::TokenMerge), and its TensorRT
    backend loads full-TensorRT engines only. The Python backend runs our ONNX Runtime runner (which registers the
    op), on ONNX files."""
    if backend == "python":
        if served_model.kind != "onnx":
            what, backend_name = (
                ("an OpenVINO IR", "OpenVINO") if served_model.kind == "openvino_ir" else ("an engine", "TensorRT")
            )
            raise InvalidInputError(
                f"{served_model.path.name} is {what}; --backend python runs ONNX files through ONNX Runtime: pass the .onnx file, "
                f"or drop --backend python to give it to Triton's {backend_name} backend"
            )
        return
    formulation = formulation_named(served_model.metadata.merge) if served_model.kind == "onnx" else None
    if formulation is not None and formulation.needs_custom_op:
        plain = either(f.name for f in all_formulations() if not f.needs_custom_op)
        raise InvalidInputError(
            f"{served_model.path.name} uses the {formulation.custom_op} op, which Triton's ONNX Runtime backend cannot run; "
            f"export with --merge {plain}, or build an engine with tome-build"
        )
    if served_model.kind == "engine" and served_model.engine_backend != "tensorrt":
        raise InvalidInputError(
            f"{served_model.path.name} was built by {served_model.engine_backend}, but Triton's TensorRT backend loads "
            "engines of full TensorRT only; build with tome-build --backend tensorrt, or give Triton the ONNX file"
        )


def triton_max_batch(served_model: ServedModel, requested: Optional[int]) -> int:
    if requested is None:
        return served_model.max_batch or 8
    if served_model.max_batch is not None and requested > served_model.max_batch:
        raise InvalidInputError(
            f"--max-batch {requested} is over the engine's profile maximum {served_model.max_batch}; pass at most that, or rebuild with a larger --max-batch"
        )
    return requested


def render_pbtxt(message: dict[str, Any], indent: int = 0) -> str:
    """Protobuf text format of a dict built by `model_config`."""
    pad, lines = "  " * indent, []
    for key, value in message.items():
        if isinstance(value, dict):
            value = [value]
        if isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for item in value:  # a (repeated) message: one block each
                lines += [f"{pad}{key} {{", render_pbtxt(item, indent + 1), f"{pad}}}"]
        elif isinstance(value, list):  # a repeated scalar
            lines.append(f"{pad}{key}: [{', '.join(_scalar(item) for item in value)}]")
        else:
            lines.append(f"{pad}{key}: {_scalar(value)}")
    return "\n".join(lines)


def tritonserver_command(root: Path) -> str:
    return f"tritonserver --model-repository={shlex.quote(str(root.resolve()))}"


def write_triton_repo(
    served_model: ServedModel, root: str | Path, options: TritonOptions, *, overwrite: bool = False
) -> TritonRepo:
    """Copy the artifact (unchanged) and write its config; an existing model folder needs overwrite=True.

    The model folder is assembled in a temporary folder inside `root` and renamed into place, so a refused
    artifact or a failed copy leaves nothing behind, and --overwrite replaces the whole folder (no stale
    version such as `2/` survives to be served instead of the new one)."""
    root = Path(root).expanduser()
    model_dir = _check_repo(served_model, root, options.model_name, overwrite)
    text = render_pbtxt(model_config(served_model, options)) + "\n"  # refuses an artifact before anything is written
    command = tritonserver_command(root)
    readme = f"# {options.model_name}\n\nServe this repository with Triton Inference Server:\n\n    {command}\n"
    if options.backend == "python":
        readme += PYTHON_README
    try:
        root.mkdir(exist_ok=True)
        staging = temporary_folder(root, prefix=f".{options.model_name}.", suffix=".tmp")
    except OSError as err:
        raise InvalidInputError(
            f"cannot create the model repository {root} ({err.strerror}); choose another directory"
        ) from err
    try:
        (staging / VERSION).mkdir()
        write_atomically(staging / VERSION / MODEL_FILE[served_model.kind], lambda out: _copy(served_model.path, out))
        for data in served_model.data_files:
            _link_or_copy(data, staging / VERSION / data.name)
        for suffix, name in COMPANION_FILES.get(served_model.kind, {}).items():
            write_atomically(staging / VERSION / name, functools.partial(_copy, served_model.path.with_suffix(suffix)))
        if options.backend == "python":
            write_atomically(staging / VERSION / "model.py", lambda out: out.write(MODEL_PY.encode()))
        write_atomically(staging / "config.pbtxt", lambda out: out.write(text.encode()))
        write_atomically(staging / "README.md", lambda out: out.write(readme.encode()))
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp creates 0700; Triton may run as another user
        _swap_in(staging, model_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        forget(staging)
    return TritonRepo(
        root, model_dir, model_dir / "config.pbtxt", model_dir / VERSION / MODEL_FILE[served_model.kind], command
    )


def _check_repo(served_model: ServedModel, root: Path, model_name: str, overwrite: bool) -> Path:
    """The model folder to write, after every check that can be made before writing."""
    for data in served_model.data_files:
        if data.suffix in (".onnx", ".plan", ".py", ".pbtxt"):
            raise InvalidInputError(
                f"{served_model.path.name} keeps its weights in {data.name}, a name Triton would take for a model "
                f"file; re-export it with tome-export, which names the weights {served_model.path.name}.data"
            )
    if root.exists() and not root.is_dir():
        raise InvalidInputError(f"{root} is a file; pass a directory for the model repository")
    if not root.parent.is_dir():
        raise InvalidInputError(f"the parent of {root} does not exist; create it first (mkdir -p {root.parent})")
    writable = root if root.is_dir() else root.parent
    try:  # a real probe: os.access says yes to root on read-only mounts
        tempfile.TemporaryFile(dir=writable).close()
    except OSError as err:
        raise InvalidInputError(
            f"{writable} is not writable ({err.strerror}); choose another directory for the model repository"
        ) from err
    model_dir = root / model_name
    if model_dir.exists() and not overwrite:
        raise InvalidInputError(
            f"{model_dir} already exists; pass --overwrite to replace it or --name for another model name"
        )
    if model_dir.exists() and not model_dir.is_dir():
        raise InvalidInputError(f"{model_dir} is a file; remove it or pass --name for another model name")
    if model_dir.is_dir() and served_model.path.resolve().is_relative_to(model_dir.resolve()):
        raise InvalidInputError(
            f"{served_model.path} is inside {model_dir}, which --overwrite would replace; copy the "
            "artifact elsewhere first or pass --name for another model name"
        )
    return model_dir


def _swap_in(staging: Path, model_dir: Path) -> None:
    """Rename the assembled folder onto `model_dir`; the old folder is moved aside first and removed after.

    Whatever stops the swap (an OSError, Ctrl-C, SIGTERM) puts the previous model back before it goes on."""
    old = None
    if model_dir.exists():
        old = temporary_folder(model_dir.parent, prefix=f".{model_dir.name}.old.", suffix=".tmp")
    try:
        if old is not None:
            os.replace(model_dir, old / model_dir.name)
        os.replace(staging, model_dir)
    except BaseException as err:
        if old is not None and (old / model_dir.name).exists() and not model_dir.exists():
            os.replace(old / model_dir.name, model_dir)  # put the previous model back
        if isinstance(err, OSError):
            raise InvalidInputError(f"cannot write {model_dir} ({err.strerror}); choose another directory") from err
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            forget(old)


PYTHON_README = """
This model runs in Triton's Python backend: `1/model.py` imports `tome_deploy` and runs `1/model.onnx`
through tome-deploy's ONNX Runtime runner. The backend's stub runs the Python whose `libpython` it loads
and ignores PYTHONPATH, so make `tome_deploy` importable there in one of three ways:

- install it into that Python: `pip install tome-deploy` (numpy, onnx and onnxruntime come with it);
- or point the server at a checkout: `TOME_DEPLOY_PYTHONPATH=/path/to/tome-deploy tritonserver ...`
  (model.py puts those folders on sys.path first);
- or pack an environment (`conda-pack`) and name it in config.pbtxt's `EXECUTION_ENV_PATH` parameter.

The stub must match that Python's version (`triton_python_backend_stub` of the same 3.X).
"""


def _tensor(spec: TensorSpec, fixed_batch) -> dict[str, Any]:
    # With max_batch_size > 0 Triton's dims leave the batch axis out; with 0 they are the full shape.
    dims = list(spec.shape) if fixed_batch is not None else list(spec.shape[1:])
    return {"name": spec.name, "data_type": ProtoEnumValue(f"TYPE_{spec.datatype}"), "dims": dims}


def _parameter_text(value: Any) -> str:
    """A string as itself; numbers and lists as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


def _scalar(value: Any) -> str:
    if isinstance(value, ProtoEnumValue):
        return str(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a JSON string literal is a valid protobuf text string for these ASCII values


def _link_or_copy(source: Path, target: Path) -> None:
    """An ONNX graph's external-data file into the version folder, under the name the graph gives it: a hard
    link where `source` is on the same file system (no second copy of weights that may exceed 2 GiB;
    tome-export replaces files by renaming, so a later export leaves the linked file as it is), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        write_atomically(target, lambda out: _copy(source, out))


def _copy(source: Path, out) -> None:
    with open(source, "rb") as stream:
        shutil.copyfileobj(stream, out, 1 << 20)
