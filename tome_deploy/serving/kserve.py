"""The KServe v2 inference protocol (the one Triton speaks): request parsing and response encoding.

Tensors travel as JSON (`data`: flat row-major or nested lists) or, with the binary tensor data
extension, as raw little-endian bytes after the JSON header, whose length is the
`Inference-Header-Content-Length` HTTP header. Everything a client can get wrong is an
InvalidInputError naming the tensor and what the model expects.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from tome_deploy.errors import InvalidInputError, ToMeError

HEADER_LENGTH = "Inference-Header-Content-Length"
# The JSON part of a request may hold at most this many bytes per value the model takes in one request
# (a float64 in shortest form is at most 24 characters, "-2.2250738585072014e-308"), plus JSON_OVERHEAD_BYTES
# for names and parameters. Checked before parsing: Python's parser needs ~8-10x the text (a float object
# and a list slot per value), so this bounds what one JSON request can allocate.
JSON_BYTES_PER_VALUE = 25
JSON_OVERHEAD_BYTES = 64 << 10


class NonFiniteOutputError(ToMeError):
    """The model produced NaN or inf, which JSON cannot carry and no client should get as scores (HTTP 500)."""

    exit_code = 3


# KServe v2 datatype -> little-endian numpy dtype (BYTES and BF16 are not tensor types these models use).
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(code).newbyteorder("<")
    for name, code in {
        "BOOL": "?",
        "UINT8": "u1",
        "UINT16": "u2",
        "UINT32": "u4",
        "UINT64": "u8",
        "INT8": "i1",
        "INT16": "i2",
        "INT32": "i4",
        "INT64": "i8",
        "FP16": "f2",
        "FP32": "f4",
        "FP64": "f8",
    }.items()
}


def datatype_of(dtype: np.dtype) -> str:
    for name, candidate in DATATYPES.items():
        if np.dtype(dtype) == candidate:
            return name
    raise InvalidInputError(
        f"tensor type {dtype} has no KServe v2 datatype; export the model with float32 inputs and outputs"
    )


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # KServe v2 name, e.g. FP32
    shape: tuple[int, ...]  # -1: dynamic (only the batch axis)
    axes: tuple[str, ...] = ()  # names of the axes after the batch (the input spec's), shown in errors; () unknown

    def to_json(self) -> dict:
        """As the model metadata shows it: the server batches, so the batch axis is always -1."""
        return {"name": self.name, "datatype": self.datatype, "shape": [-1, *self.shape[1:]]}


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    id: Optional[str]
    inputs: dict[str, np.ndarray]
    outputs: tuple[RequestedOutput, ...]
    timeout_s: Optional[float]  # from the request's `timeout` parameter (microseconds)


def parse_infer_request(
    body: bytes,
    header_length: Optional[str],
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch: int,
) -> InferRequest:
    """Decode and check one infer request against the model's tensors; axis 0 is the batch (1..max_batch)."""
    json_limit = JSON_OVERHEAD_BYTES + JSON_BYTES_PER_VALUE * max_batch * sum(
        math.prod(spec.shape[1:]) for spec in inputs
    )
    header, binary = _split_body(body, header_length, json_limit)
    request = _object(header, "the request")
    parameters = _object(request.get("parameters", {}), "'parameters'")
    by_name = {spec.name: spec for spec in inputs}
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInputError(f"the request needs an 'inputs' list; this model takes {_names(inputs)}")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for raw in raw_inputs:
        raw = _object(raw, "each entry of 'inputs'")
        name = raw.get("name")
        if not isinstance(name, str) or name not in by_name:
            raise InvalidInputError(f"unknown input {name!r}; this model takes {_names(inputs)}")
        if name in arrays:
            raise InvalidInputError(f"input {name!r} appears twice; send each input once")
        array, offset = _decode_tensor(raw, by_name[name], binary, offset, max_batch)
        arrays[name] = array
    if offset != len(binary):
        raise InvalidInputError(
            f"the body has {len(binary) - offset} binary bytes that no input claims; make binary_data_size match the data"
        )
    missing = [spec.name for spec in inputs if spec.name not in arrays]
    if missing:
        raise InvalidInputError(f"missing input(s) {missing}; this model takes {_names(inputs)}")
    rows = {len(array) for array in arrays.values()}
    if len(rows) > 1:
        raise InvalidInputError(
            f"inputs disagree on the batch size ({sorted(rows)}); send the same number of rows for every input"
        )
    return InferRequest(
        id=_request_id(request.get("id")),
        inputs=arrays,
        outputs=_requested_outputs(request.get("outputs"), outputs, _flag(parameters, "binary_data_output", False)),
        timeout_s=_timeout_s(parameters.get("timeout")),
    )


def encode_infer_response(
    model_name: str, version: str, request: InferRequest, results: dict[str, np.ndarray]
) -> tuple[bytes, Optional[int]]:
    """The response body and, when some outputs are binary, the JSON header's length (for the HTTP header)."""
    outputs, blobs = [], []
    for wanted in request.outputs:
        value = results[wanted.name]
        if not wanted.binary:
            check_finite_output(wanted.name, value)
        entry: dict[str, Any] = {"name": wanted.name, "datatype": datatype_of(value.dtype), "shape": list(value.shape)}
        if wanted.binary:
            blob = np.ascontiguousarray(value, dtype=DATATYPES[entry["datatype"]]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = value.ravel().tolist()
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": version, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, allow_nan=False).encode()
    return (header + b"".join(blobs), len(header)) if blobs else (header, None)


def check_finite_output(name: str, value: np.ndarray) -> None:
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        bad = int(value.size - np.isfinite(value).sum())
        raise NonFiniteOutputError(
            f"the model's output {name!r} has {bad} non-finite values (NaN or inf); the artifact is broken: "
            "check it with tome-validate and re-export (binary_data outputs carry the raw values)"
        )


def _split_body(body: bytes, header_length: Optional[str], json_limit: int) -> tuple[Any, bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInputError(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < length <= len(body):
            raise InvalidInputError(
                f"{HEADER_LENGTH} is {length} but the body has {len(body)} bytes; send the JSON header's byte length"
            )
        json_part, binary = body[:length], body[length:]
    if len(json_part) > json_limit:
        raise InvalidInputError(
            f"the JSON part of the request has {len(json_part)} bytes, more than this model's largest request can need ({json_limit}); "
            "send fewer rows, or the tensors as binary data (Inference-Header-Content-Length)"
        )
    try:
        return json.loads(json_part), binary
    except RecursionError:
        raise InvalidInputError(
            "the request JSON is nested too deeply; send a KServe v2 infer request (tensors as flat 'data' lists)"
        ) from None
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"the request is not valid JSON ({err}); send a KServe v2 infer request") from None


def _decode_tensor(raw: dict, spec: TensorSpec, binary: bytes, offset: int, max_batch: int) -> tuple[np.ndarray, int]:
    """One request input -> array of the model's dtype and shape [n, ...]; also the new binary offset."""
    if raw.get("datatype") != spec.datatype:
        raise InvalidInputError(
            f"input {spec.name!r} has datatype {raw.get('datatype')!r}; the model takes {spec.datatype}"
        )
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInputError(f"input {spec.name!r} needs 'shape' as a list of integers, e.g. {[1, *spec.shape[1:]]}")
    if len(shape) != len(spec.shape) or shape[1:] != list(spec.shape[1:]):
        named = f" ({', '.join(('batch', *spec.axes))})" if spec.axes else ""
        raise InvalidInputError(
            f"input {spec.name!r} has shape {shape}; the model takes [batch, {', '.join(map(str, spec.shape[1:]))}]{named}"
        )
    if not 1 <= shape[0] <= max_batch:
        raise InvalidInputError(f"input {spec.name!r} has batch {shape[0]}; send 1 to {max_batch} rows per request")
    dtype, count = DATATYPES[spec.datatype], math.prod(shape)
    parameters = _object(raw.get("parameters", {}), f"input {spec.name!r} 'parameters'")
    if "shared_memory_region" in parameters:
        raise InvalidInputError(
            f"input {spec.name!r} uses shared memory, which this server does not offer; send the data in the body"
        )
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if not isinstance(size, int) or size != count * dtype.itemsize or offset + size > len(binary):
            raise InvalidInputError(
                f"input {spec.name!r} declares binary_data_size {size!r}; shape {shape} of {spec.datatype} needs {count * dtype.itemsize} bytes in the body"
            )
        array = np.frombuffer(binary, dtype, count, offset).reshape(shape)
        offset += size
    else:
        array = _json_tensor(raw.get("data"), spec, shape, dtype)
    if dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        raise InvalidInputError(
            f"input {spec.name!r} has {bad} non-finite values (NaN or inf); send finite, normalised pixels"
        )
    return array.astype(dtype.newbyteorder("="), copy=False), offset


def _json_tensor(data: Any, spec: TensorSpec, shape: list[int], dtype: np.dtype) -> np.ndarray:
    if data is None:
        raise InvalidInputError(
            f"input {spec.name!r} has neither 'data' nor a binary_data_size parameter; send one of them"
        )
    try:
        values = np.asarray(data)
    except ValueError:
        raise InvalidInputError(
            f"input {spec.name!r} 'data' is ragged; send a flat or evenly nested list of numbers"
        ) from None
    allowed = "biuf" if dtype.kind == "f" else "biu" if dtype.kind in "iu" else "b"
    if values.dtype.kind not in allowed:
        raise InvalidInputError(
            f"input {spec.name!r} 'data' holds {values.dtype.kind!r}-kind values, not {spec.datatype} numbers; send numbers only"
        )
    if values.size != math.prod(shape):
        raise InvalidInputError(
            f"input {spec.name!r} 'data' has {values.size} values but shape {shape} needs {math.prod(shape)}"
        )
    with np.errstate(over="ignore"):  # an out-of-range float becomes inf and is refused as non-finite
        return values.reshape(shape).astype(dtype)


def _requested_outputs(raw: Any, outputs: Sequence[TensorSpec], binary_default: bool) -> tuple[RequestedOutput, ...]:
    if raw is None:
        return tuple(RequestedOutput(spec.name, binary_default) for spec in outputs)
    if not isinstance(raw, list):
        raise InvalidInputError("'outputs' must be a list of {\"name\": ...} objects")
    known, wanted = {spec.name for spec in outputs}, []
    seen: set[str] = set()
    for entry in raw:
        entry = _object(entry, "each entry of 'outputs'")
        parameters = _object(entry.get("parameters", {}), "output 'parameters'")
        if not isinstance(entry.get("name"), str) or entry.get("name") not in known:
            raise InvalidInputError(f"unknown output {entry.get('name')!r}; this model returns {sorted(known)}")
        if entry["name"] in seen:  # each output once: the response is bounded by the model's outputs
            raise InvalidInputError(f"output {entry['name']!r} is asked for twice; list each output once")
        seen.add(entry["name"])
        if _flag(parameters, "class_count", 0) or "shared_memory_region" in parameters:
            raise InvalidInputError(
                "class_count and shared-memory outputs are not offered; ask for raw outputs, or POST an image to the classify endpoint for top-k"
            )
        wanted.append(RequestedOutput(entry["name"], _flag(parameters, "binary_data", binary_default)))
    return tuple(wanted)


MAX_TIMEOUT_US = 86_400 * 10**6  # a day; the server's --timeout-s caps a request's timeout anyway


def _timeout_s(value: Any) -> Optional[float]:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_TIMEOUT_US:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise InvalidInputError(
            f"parameter 'timeout' must be a positive integer (microseconds) up to {MAX_TIMEOUT_US}, got {shown}"
        )
    return value / 1e6


def _flag(parameters: dict, name: str, default: Any) -> Any:
    """A boolean parameter (binary_data, binary_data_output) or class_count: a JSON bool, or an integer for
    class_count; anything else (a string, a 400-digit number) is refused rather than guessed."""
    value = parameters.get(name, default)
    if isinstance(value, bool) or (name == "class_count" and isinstance(value, int) and 0 <= value <= 2**31):
        return value
    expected = "a non-negative integer" if name == "class_count" else "true or false"
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
    raise InvalidInputError(f"parameter {name!r} must be {expected}, got {shown}")


def _request_id(value: Any) -> Optional[str]:
    if value is None or isinstance(value, str):
        return value
    raise InvalidInputError(f"'id' must be a string, got {value!r}")


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object; see the KServe v2 infer request format")
    return value


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{s.name} ({s.datatype} [batch, {', '.join(map(str, s.shape[1:]))}])" for s in specs)
