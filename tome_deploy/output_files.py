"""The one policy for every file a command writes.

Checked before any work starts (`check_outputs`): an output is not a directory, nor an existing device node,
FIFO or socket (it would be replaced by a regular file), its folder exists and is
writable, it is not one of the command's inputs (same resolved path, symlink or hard link) and not another
of its outputs. Written atomically (`write_atomically`, `StagedOutput`): through a temporary file in the
same folder renamed over the target, so a failure or Ctrl-C (or SIGTERM / SIGHUP, which the CLIs turn into
the same interrupt) leaves the old file intact and no partial file. Every temporary file and folder made here
is also registered until it is renamed or removed: `discard_temporaries` (run by every CLI on its way out)
removes any that an interrupt left between its creation and the block that owns it.
A result that still has to pass a check (an ONNX export before its parity validation), or that is several
files which must land together (an ONNX graph and its external-data file), is staged (`StagedOutput`):
written in a temporary folder next to the target and renamed over it only once it passed, all files or none.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from tome_deploy.errors import InvalidInputError

PathLike = str | Path

_LIVE: set[Path] = set()  # temporary files and folders made and not yet renamed or removed


def discard_temporaries() -> None:
    """Remove every registered temporary file or folder that still exists (after an interrupt)."""
    while _LIVE:
        path = _LIVE.pop()
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def temporary_folder(folder: Path, prefix: str, suffix: str = "") -> Path:
    """tempfile.mkdtemp in `folder`, registered for `discard_temporaries`; `forget` it once renamed or removed."""
    path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=folder))
    _LIVE.add(path)
    return path


def forget(path: Path) -> None:
    """`path` was renamed into place or removed: no longer a temporary to discard."""
    _LIVE.discard(path)


def _same_file(a: Path, b: Path) -> bool:
    """Same file on disk (resolved symlinks, hard links), or the same resolved path when one does not exist yet."""
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _check_folder(path: Path, flag: str) -> None:
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InvalidInputError(f"{flag} {path} is a directory; pass a file path inside it")
    _check_regular(path, flag)
    if not folder.is_dir():
        raise InvalidInputError(
            f"output directory {folder} does not exist; create it first (mkdir -p {folder}) or choose another {flag} path"
        )
    try:  # a real probe: os.access says yes to root on read-only mounts and ignores ACLs
        probe = _temp_next_to(folder / path.name)
        probe.unlink()
        forget(probe)
    except OSError as err:
        raise InvalidInputError(
            f"output directory {folder} is not writable ({err.strerror or err}); choose another {flag} path"
        ) from err


def _check_regular(path: Path, flag: str) -> None:
    """An existing target (followed through symlinks) must be a regular file: the rename that writes it would
    put a file in place of a device node, FIFO or socket (as root, /dev/null itself)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise InvalidInputError(
            f"cannot inspect {flag} {path} ({err.strerror or err}); choose another {flag} path"
        ) from err
    if not stat.S_ISREG(mode):
        kind = (
            "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise InvalidInputError(f"{flag} {path} is {kind}, which tome-deploy never replaces; pass a regular file path")


def check_output_path(output: PathLike, inputs: Iterable[Optional[PathLike]] = (), *, flag: str = "-o") -> Path:
    """One output: not a directory, in a writable folder that exists, and not one of `inputs`."""
    return check_outputs({flag: output}, inputs)[flag]


def check_outputs(
    outputs: Mapping[str, Optional[PathLike]], inputs: Iterable[Optional[PathLike]] = ()
) -> dict[str, Path]:
    """Every output of one command (flag -> path; None: not written) against the policy above.

    `inputs` are the files the command reads (model, checkpoint, artifact...); entries that are not existing
    files (a timm model name, None) are ignored. A file that is both read and updated (a timing cache) is
    passed as an output only."""
    existing_inputs = [Path(p).expanduser() for p in inputs if p is not None and Path(p).expanduser().is_file()]
    checked: dict[str, Path] = {}
    for flag, output in outputs.items():
        if output is None:
            continue
        path = Path(output).expanduser()
        _check_folder(path, flag)
        for given in existing_inputs:
            if _same_file(path, given):
                raise InvalidInputError(
                    f"{flag} {path} is also an input of this command ({given}); choose another "
                    f"{flag} path so nothing you passed in is overwritten"
                )
        for other_flag, other in checked.items():
            if _same_file(path, other):
                raise InvalidInputError(f"{flag} {path} is also the {other_flag} output; give each output its own path")
        checked[flag] = path
    return checked


def _temp_next_to(path: Path) -> Path:
    handle, name = tempfile.mkstemp(suffix=".tmp", prefix=f".{path.name}.", dir=path.parent)
    _LIVE.add(Path(name))
    os.close(handle)
    return Path(name)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _install(temp: Path, path: Path) -> None:
    os.chmod(temp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file the usual permissions
    os.replace(temp, path)
    forget(temp)


def write_atomically(output: PathLike, write: Callable[[BinaryIO], object], *, flag: str = "-o") -> Path:
    """Write through a temporary file in the same folder, then rename over `output`."""
    path = check_output_path(output, flag=flag)
    temp = _writable_temp(path, flag)
    try:
        with open(temp, "wb") as stream:
            write(stream)
        _install(temp, path)
    except OSError as err:
        raise _write_error(path, flag, err) from err
    finally:
        temp.unlink(missing_ok=True)
        forget(temp)
    return path


def _writable_temp(path: Path, flag: str) -> Path:
    try:
        return _temp_next_to(path)
    except OSError as err:
        raise _write_error(path, flag, err) from err


def _write_error(path: Path, flag: str, err: OSError) -> InvalidInputError:
    return InvalidInputError(f"cannot write {path} ({err.strerror or err}); choose another {flag} path")


class StagedOutput:
    """Files written in a temporary folder next to `target`, under their final names, and moved beside it
    only by `commit()`: the target and its companions land together, or none of them does.

    `temp` is where the target is written (the staging folder's file of the target's name), so a file that
    names its companions by a relative path (an ONNX graph naming its external-data file) reads the staged
    ones until the commit, and the final ones after it. `companions`: other files beside `target` that belong
    to it; the caller has decided that the existing ones may be replaced. commit() moves each staged
    companion over its namesake, removes an existing companion that was not staged (the previous version's,
    which the new target no longer names) and renames the target last; Ctrl-C, SIGTERM and SIGHUP are held
    back during those renames, and a rename that fails puts every file back as it was. Leaving the block
    without a commit (a failed check, an exception, Ctrl-C) deletes the staging folder, and every target
    keeps whatever it held before."""

    def __init__(self, target: PathLike, *, flag: str = "-o", companions: Iterable[PathLike] = ()):
        self.target = check_output_path(target, flag=flag)
        self.companions = tuple(check_output_path(self.target.parent / Path(c).name, flag=flag) for c in companions)
        self.flag = flag
        try:
            self.folder = temporary_folder(self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp")
        except OSError as err:
            raise _write_error(self.target, flag, err) from err
        self.temp = self.folder / self.target.name

    def commit(self) -> Path:
        moves = [(self.folder / c.name, c) for c in self.companions] + [(self.temp, self.target)]
        try:
            with _stop_signals_held():
                _replace_together(moves, self.folder)
        except OSError as err:
            raise _write_error(self.target, self.flag, err) from err
        self.discard()
        return self.target

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        forget(self.folder)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", signal.SIGTERM)}


@contextlib.contextmanager
def _stop_signals_held():
    """Ctrl-C, SIGTERM and SIGHUP wait until the block is done (then they act as usual): a few renames that
    must happen all together. Blocking is per thread and POSIX only; elsewhere the block just runs."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _replace_together(moves: list[tuple[Path, Path]], aside: Path) -> None:
    """Rename every (staged, target) of `moves`, in order; a target whose staged file does not exist is
    removed instead. The last target is renamed over directly (atomic on its own); earlier ones that exist
    are first moved into `aside` (a folder on the same file system), so that an OSError can put them back."""
    placed: list[Path] = []  # targets renamed in so far
    kept: list[tuple[Path, Path]] = []  # (previous file moved aside, its target)
    try:
        for index, (staged, target) in enumerate(moves):
            if index < len(moves) - 1 and (target.exists() or target.is_symlink()):
                kept.append((aside / f".previous.{target.name}", target))
                os.replace(target, kept[-1][0])
            if staged.exists():
                os.chmod(staged, 0o666 & ~current_umask())  # mkstemp and mkdtemp create owner-only files
                os.replace(staged, target)
                placed.append(target)
    except OSError:
        for target in placed:
            target.unlink(missing_ok=True)
        for previous, target in kept:
            os.replace(previous, target)
        raise


def companion_path(target: Path, suffix: str) -> Path:
    """The file written next to `target` under the same name with `suffix` (an OpenVINO IR's .bin)."""
    return target.with_suffix(suffix)
