"""One policy for every file a command reads: images, labels files, checkpoints and model configs, ONNX files,
engines and their sidecars, tune files and the images of --data.

A file we read must be a regular file (symlinks followed), checked when it is opened and before a byte is
read: opening a FIFO waits for a writer that may never come, a device such as /dev/zero never ends and a
directory is not a file. Each is one InvalidInputError line naming the file and what it is (exit 2), the
same rule `output_files` applies to the files a command writes. Files are opened without blocking, so
even a FIFO is refused at once; what a reader does with a missing file (OSError) stays its own.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from tome_deploy.errors import InvalidInputError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a stat mode is, in words: 'a regular file', 'a FIFO (named pipe)', 'a directory', ..."""
    return next((kind for test, kind in _KINDS if test(mode)), "a regular file" if stat.S_ISREG(mode) else "not a file")


def _refuse(path: Path, mode: int, what: str) -> InvalidInputError:
    return InvalidInputError(
        f"{what} {path} is {file_kind(mode)}, not a regular file; pass a regular file (a FIFO or device is never read)"
    )


def check_input_file(path: str | Path, what: str) -> Path:
    """`path` (user home expanded) when it is an existing regular file, symlinks followed; InvalidInputError
    naming `what` (e.g. "image", "checkpoint") when it does not exist or is a directory, FIFO, device or socket."""
    path = Path(path).expanduser()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InvalidInputError(f"{what} {path} does not exist; pass the path of an existing file") from None
    except OSError as err:
        raise InvalidInputError(f"{what} {path} cannot be read ({err.strerror or type(err).__name__})") from None
    if not stat.S_ISREG(mode):
        raise _refuse(path, mode, what)
    return path


@contextlib.contextmanager
def open_input(path: str | Path, what: str) -> Iterator[BinaryIO]:
    """`path` opened for reading in binary, once it is known to be a regular file: opened without blocking (a
    FIFO does not wait for a writer) and checked on the open descriptor, so the file checked is the file read.
    InvalidInputError naming `what` for anything but a regular file; OSError (missing, no permission) as is."""
    path = Path(path).expanduser()
    descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(descriptor, "rb") as stream:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise _refuse(path, mode, what)
        yield stream


def read_input_bytes(path: str | Path, what: str, max_bytes: int) -> bytes:
    """The whole of a regular file of at most `max_bytes` (open_input's policy); InvalidInputError for a larger
    one, read no further than one byte past the limit. OSError (missing, no permission) as is."""
    with open_input(path, what) as stream:
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise InvalidInputError(f"{what} {Path(path).expanduser()} is over {_size(max_bytes)}; it is not a {what}")
    return data


def _size(count: int) -> str:
    return f"{count >> 20} MiB" if count >= 1 << 20 else f"{count} bytes"
