"""Atomic file writes: a reader (or a kill at any moment) sees the old file or the new one, never half.

The one place that writes a file through a temporary sibling and a rename; every record, status,
cache and checkpoint file of the harness goes through here (checkpoints ask for ``durable``).
Also the one check that an output folder is writable before a command starts its work.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from harness.core.errors import UserError


class DiskFull(UserError):
    """A write ran out of space; the message names the path, the space needed and the space free."""


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, durable: bool = False, size: int | None = None) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary sibling, renamed over ``path`` when the
    block ends without an error (removed otherwise). ``durable`` also flushes the file and the
    rename to disk (checkpoints: a crash of the machine, not only of the process, keeps one).
    A write that runs out of space raises :class:`DiskFull` (``size``: about how many bytes the
    file needs), whatever the writer made of the error (torch's says "unexpected pos")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _disk_full(path, size) if err.errno == errno.ENOSPC else err from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and _out_of_space(err, path, size):
            raise _disk_full(path, size) from None
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _out_of_space(err: Exception, path: Path, size: int | None) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return shutil.disk_usage(path.parent).free < max(size or 0, 1 << 20)  # the writer hid the ENOSPC


def _disk_full(path: Path, size: int | None) -> DiskFull:
    free = shutil.disk_usage(path.parent).free
    need = f"about {size / 2**20:,.1f} MB needed, " if size else ""
    return DiskFull(f"no space left on the device of {path} ({need}{free / 2**20:,.1f} MB free): free space there, "
                    "or point the run's folder (--runs-dir, --out) at another disk")


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    data = data.encode() if isinstance(data, str) else data
    with atomic_writer(path, size=len(data)) as f:
        f.write(data)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a folder this process can write into, created if missing; else a one-line
    UserError naming ``what`` (e.g. "--out") and the fix. Commands call it before any work."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise NotADirectoryError
        # a real file: the one test that permission bits, ACLs and read-only mounts all answer
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        reason = (f"{blocker} is a file" if blocker is not None
                  else err.strerror.lower() if err.strerror else type(err).__name__)
        raise UserError(f"{what} {path} is not a writable folder ({reason}): pick a folder you can "
                        f"write to") from None
    return path
