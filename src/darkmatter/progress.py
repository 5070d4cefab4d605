"""Progress reporting shared by the long steps: callbacks of (done, total, rate per second)."""

from __future__ import annotations

import time
from collections.abc import Callable

Progress = Callable[[int, int, float], None]
"""(units done, units total, units per second); the units are tokens unless a step says otherwise."""

ProgressFactory = Callable[..., "Progress | None"]
"""``factory(name, unit="tok")`` -> a ``Progress`` callback for one bar, or None for no display."""


def no_progress(_name: str, _unit: str = "tok") -> Progress | None:
    """The factory that displays nothing."""
    return None


class Ticker:
    """Counts units toward a known total and reports them with the running rate."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, max(int(total), 1), 0
        self.t0 = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done = min(self.done + int(n), self.total)
        if self.progress is not None:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.progress(self.done, self.total, rate)
