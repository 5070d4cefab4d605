"""Heap trimming between batches: found on glibc, called at the configured cadence, harmless elsewhere."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from darkmatter import heap


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_trim_gives_freed_heap_back_on_glibc() -> None:
    assert heap._malloc_trim() is not None

    def resident_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20

    blocks = [bytes(4096) for _ in range(20_000)]  # ~80 MiB of heap chunks, not mmapped
    sentinel = bytes(4096)  # keeps the heap top in use, so free() alone cannot shrink the heap
    del blocks
    before = resident_mib()
    assert heap.release_free_heap() is True
    assert before - resident_mib() > 40, "malloc_trim released less than half of the freed heap"
    del sentinel


def test_releaser_trims_once_per_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(heap, "release_free_heap", lambda: calls.append(1) or True)
    r = heap.HeapReleaser(every=1000)
    for _ in range(9):
        r.tick(300)  # 2700 tokens: trims after 1200 and 2400
    assert len(calls) == 2
    r.tick(5000)
    assert len(calls) == 3


def test_missing_libc_function_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.release_free_heap() is False
