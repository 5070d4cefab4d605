"""One run per output folder: an advisory lock held for the whole run.

The lock is ``fcntl.flock`` on ``OUT/.darkmatter.lock``, which also holds the PID of the run that took it.
The kernel drops the lock when its process dies, so a lock left by a killed run is simply taken over;
a second live run on the same folder is refused at once, naming the holder. Where ``fcntl`` does not
exist (Windows) runs are not locked.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from darkmatter.errors import ConfigError, RunLockedError, WriteError

LOCK_FILE = ".darkmatter.lock"


@contextlib.contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    """Hold the output folder's lock for the duration of the block (re-entrant within one process)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    folder = Path(out)
    key = str(folder.resolve())
    if key in _HELD:
        yield
        return
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a folder; choose another output folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise WriteError(f"Cannot create {folder / LOCK_FILE}: {exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"{folder} is in use by another darkmatter run (PID {_holder(fd)}); wait for it to finish "
                "or choose another --out."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


_HELD: set[str] = set()


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip() or "unknown"
    except OSError:
        return "unknown"
