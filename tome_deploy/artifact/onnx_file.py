"""Reading tome-deploy ONNX files: the graph without external weights, its ToMe metadata, and the
external-data file(s) beside it that hold the weights of a large model. Imports onnx, not torch."""

from __future__ import annotations

from pathlib import Path

from tome_deploy.artifact.metadata import ToMeMetadata
from tome_deploy.artifact.spec import EXTERNAL_DATA_SUFFIX
from tome_deploy.errors import InvalidInputError
from tome_deploy.input_files import check_input_file


def load_onnx(path: str | Path):
    """An ONNX file's graph and metadata (external weights are not loaded); InvalidInputError when unreadable."""
    import onnx

    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"no such ONNX file: {path}")
    check_input_file(path, "ONNX file")  # a FIFO or device is refused before it is opened
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError, OSError, ...
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InvalidInputError(
            f"{path} is not a readable ONNX file ({detail}); pass a file written by tome-export"
        ) from err


def external_data_path(graph: str | Path) -> Path:
    """Where tome-export puts the weights of the graph at `graph` when they go to an external-data file."""
    graph = Path(graph)
    return graph.with_name(graph.name + EXTERNAL_DATA_SUFFIX)


def _tensors(graph):
    """Every TensorProto of a GraphProto: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _tensors(subgraph)


def external_data_files(model_proto, graph: str | Path) -> tuple[Path, ...]:
    """The files beside `graph` that hold the tensors of `model_proto` (loaded from `graph` without its
    external data); () for a single-file model. InvalidInputError for a location that is not a file name
    in the graph's own folder (a path elsewhere, which tome-deploy does not follow) or a missing file."""
    import onnx

    graph = Path(graph)
    names: dict[str, None] = {}  # ordered set
    for tensor in _tensors(model_proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update({entry.value: None for entry in tensor.external_data if entry.key == "location"})
    files = []
    for name in names:
        if Path(name).name != name or name in ("", ".", ".."):
            raise InvalidInputError(
                f"{graph} keeps weights at {name!r}, which is not a file beside it; tome-deploy reads external "
                "data only from files in the graph's own folder: re-export it with tome-export"
            )
        if not (graph.parent / name).is_file():
            raise InvalidInputError(
                f"{graph} keeps its weights in {name}, which is missing; put {name} back beside {graph.name} "
                "(an ONNX graph and its external-data file travel together)"
            )
        files.append(graph.parent / name)
    return tuple(files)


def tome_metadata(model_proto, source: str | Path = "the ONNX file") -> ToMeMetadata | None:
    """The ToMe metadata of a loaded ONNX model, or None when tome-export did not write it.

    Raises MetadataError (damaged values) or NewerSchemaError (a newer tome-deploy wrote it), naming `source`."""
    return ToMeMetadata.from_props({p.key: p.value for p in model_proto.metadata_props}, str(source))


def read_metadata(path: str | Path) -> ToMeMetadata | None:
    """The ToMe metadata of an ONNX file, or None for a file that is not a tome-deploy export."""
    return tome_metadata(load_onnx(path), path)
