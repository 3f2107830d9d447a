"""Reading tome-deploy ONNX files: the graph without external weights, and its ToMe metadata. Imports onnx, not torch."""

from __future__ import annotations

from pathlib import Path

from tome_deploy.artifact.metadata import ToMeMetadata
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


def tome_metadata(model_proto, source: str | Path = "the ONNX file") -> ToMeMetadata | None:
    """The ToMe metadata of a loaded ONNX model, or None when tome-export did not write it.

    Raises MetadataError (damaged values) or NewerSchemaError (a newer tome-deploy wrote it), naming `source`."""
    return ToMeMetadata.from_props({p.key: p.value for p in model_proto.metadata_props}, str(source))


def read_metadata(path: str | Path) -> ToMeMetadata | None:
    """The ToMe metadata of an ONNX file, or None for a file that is not a tome-deploy export."""
    return tome_metadata(load_onnx(path), path)
