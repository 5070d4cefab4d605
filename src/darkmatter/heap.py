"""Return freed heap pages to the operating system between the batches of a long streaming pass.

The engine allocates the same few large temporaries for every batch. glibc raises its mmap threshold
after the first large free, so later temporaries come from the heap, and the holes they leave grow the
heap batch by batch: over 200k tokens the per-token pass gained ~200 MiB of free-but-resident heap.
``malloc_trim`` every few batches gives those pages back (measured: the pass stays flat). A no-op where
the C library has no ``malloc_trim`` (macOS, musl, Windows).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release_free_heap() -> bool:
    """Give free heap memory back to the OS; True when the C library could."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


class HeapReleaser:
    """Calls `release_free_heap` once every ``every`` units (tokens) of a streaming pass.

    Trimming returns pages that the next batch faults back in: after every 1024-token batch that cost
    the engine ~15% of its time, once per 8192 tokens ~2%, while the heap still stays flat.
    """

    def __init__(self, every: int = 8192):
        self.every, self.pending = every, 0

    def tick(self, n: int) -> None:
        self.pending += n
        if self.pending >= self.every:
            self.pending = 0
            release_free_heap()
