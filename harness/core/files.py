"""Atomic file writes: a reader (or a kill at any moment) sees the old file or the new one, never half.

The one place that writes a file through a temporary sibling and a rename; every record, status,
cache and checkpoint file of the harness goes through here (checkpoints ask for ``durable``).
Also the one check that an output folder is writable before a command starts its work.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from harness.core.errors import UserError


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, *, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a temporary sibling, renamed over ``path`` when the
    block ends without an error (removed otherwise). ``durable`` also flushes the file and the
    rename to disk (checkpoints: a crash of the machine, not only of the process, keeps one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    with atomic_writer(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)


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
