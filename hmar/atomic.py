"""Writing a file so that no reader, crash or signal ever sees half of it.

Every file hmar writes (PNGs, weight files, config files, training checkpoints, run records, token
caches, sample grids) goes through `atomic_write`: the content is written to a temporary file of a
unique name in the target's folder (private to its owner while it is incomplete), then moved onto
the target in one step. Any exception while writing — KeyboardInterrupt and SystemExit included,
which is how the CLI's SIGINT / SIGTERM handlers end a command — removes the temporary file.

Durability: only training checkpoints ask for `durable=True` (the file and its folder are flushed
to disk before and after the rename), because a run resumes from them after a power loss or a
killed machine. Images, model folders, run records and caches are not flushed: the rename still
makes them all-or-nothing, and a file lost to a power cut is written again by running the command
again.
"""
from __future__ import annotations

import errno
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from hmar.file_mode import ordinary_file_mode


@contextmanager
def atomic_write(path: str | os.PathLike, *, overwrite: bool = False, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write; when the block ends without an
    exception the file takes the mode an ordinary new file would have and becomes `path`.

    Without `overwrite` an existing `path` is never replaced, not even one that appears while the
    content is being written: FileExistsError. Other failures are the OSError the file system
    raised (a missing or read-only folder, a full disk); callers turn both into their own errors.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path))
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    temporary = Path(name)
    try:
        os.close(handle)
        yield temporary
        os.chmod(temporary, ordinary_file_mode())
        if durable:
            _flush(temporary)
        if overwrite:
            os.replace(temporary, path)
        else:
            _move_without_replacing(temporary, path)
        if durable:
            _flush(folder)
    finally:
        temporary.unlink(missing_ok=True)


def _move_without_replacing(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # atomic, and fails if the target exists; the source is removed after
    except FileExistsError:
        raise
    except OSError:  # file systems without hard links: check, then rename
        if target.exists():
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.replace(source, target)


def _flush(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
