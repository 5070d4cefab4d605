"""A process's own peak resident memory, for benchmarks that run each variant in a child process.

``getrusage(...).ru_maxrss`` is no good there: on Linux it survives ``execve``, so a child reports at least
the peak of the parent it was spawned from (a parent that built a 200k-token store passes on ~430 MiB).
``VmHWM`` in ``/proc/self/status`` belongs to the process's own address space, which ``execve`` replaces.
"""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss_kb() -> int:
    """Peak resident set size of this process's address space, in KiB."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # elsewhere: the best available
