"""Atomic file writes: every output appears whole or not at all.

A file is written under a temporary name ``.NAME.*.tmp`` in its own folder, flushed and fsynced, renamed
over the target, and the folder is fsynced. A killed process leaves at most a temporary file, which
``remove_temporaries`` deletes on the next run; the previous version of the target stays intact. A full
disk or a permission problem becomes one ``WriteError`` that names the file.

Call these through the module (``atomic.write_bytes(...)``) so one place decides how files are written.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from darkmatter.errors import WriteError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _file_mode() -> int:
    """Mode of a plainly created file under the process umask (mkstemp's own files are 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` or what caused it is a full disk, also as writers with their own error types report
    it (safetensors: ``SafetensorError("... No space left on device (os error 28)")``)."""
    for _ in range(8):  # a short chain of causes
        if exc is None:
            return False
        if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _write_error(path: Path, exc: BaseException) -> WriteError:
    if _disk_full(exc):
        return WriteError(
            f"Disk full while writing {path}. Nothing already written was changed; free space and run the "
            "same command again to resume."
        )
    return WriteError(f"Could not write {path}: {exc}")


@contextlib.contextmanager
def target(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; moved into place when the block ends cleanly.

    For writers that need a file name (matplotlib, Parquet, safetensors). On an exception the temporary
    file is deleted and ``path`` is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    tmp = Path(name)
    try:
        yield tmp
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if _disk_full(exc):
            raise _write_error(path, exc) from exc
        raise
    try:
        tmp.chmod(_file_mode())
        _fsync_file(tmp)
        tmp.replace(path)
        _fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _write_error(path, exc) from exc


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one."""
    with target(path) as tmp:
        try:
            tmp.write_bytes(data)
        except OSError as exc:
            raise _write_error(Path(path), exc) from exc


def write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any, *, sort_keys: bool = True) -> None:
    """Write pretty JSON atomically (``default=str`` for paths and other plain values)."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n").encode())


def remove_temporaries(root: str | Path) -> int:
    """Delete the temporary files killed writers left under ``root``; returns how many."""
    root = Path(root)
    removed = 0
    if root.is_dir():
        for path in root.rglob(".*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
    return removed
