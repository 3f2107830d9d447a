"""Writing results safely: the target folder is checked up front and files appear whole or not at all."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from tome_deploy.errors import InvalidInputError


def check_output_path(output: str | Path, inputs: tuple[Optional[str | Path], ...] = ()) -> Path:
    """The output's folder must exist and be writable, and the output must not overwrite an input."""
    path = Path(output).expanduser()
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InvalidInputError(f"output {path} is a directory; pass a file path inside it")
    if not folder.is_dir():
        raise InvalidInputError(f"output directory {folder} does not exist; create it first (mkdir -p {folder})")
    if not os.access(folder, os.W_OK):
        raise InvalidInputError(f"output directory {folder} is not writable; choose another -o path")
    for given in inputs:
        if given is not None and Path(given).exists() and path.exists() and path.resolve() == Path(given).resolve():
            raise InvalidInputError(f"output {path} is also an input; choose another -o path so nothing is overwritten")
    return path


def write_atomically(output: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through a temporary file in the same folder, then rename over `output`."""
    path = check_output_path(output)
    handle, temp_name = tempfile.mkstemp(suffix=".tmp", prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(temp_name, path)
    except OSError as err:
        raise InvalidInputError(f"cannot write {path} ({err.strerror or err}); choose another -o path") from err
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path
