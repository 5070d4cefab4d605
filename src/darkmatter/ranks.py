"""Data parallelism across processes launched by ``torchrun``: who this process is, how work is dealt,
how sums meet, and how one rank's failure reaches the others.

``torchrun --nproc-per-node N -m darkmatter run ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set; ``from_environment`` joins them into one process group (NCCL on GPUs, gloo on CPUs).
A process started without those variables is rank 0 of 1 and every method here is a no-op.

Work is dealt in contiguous runs (rank r gets the r-th run of ``share``), so the parts concatenated in rank
order are the whole in its original order. Failures: a rank that fails writes its message to
``OUT/.ranks/failed-<rank>.txt`` before it exits; ``torchrun`` then stops the other ranks, which print
that message with their own rank and exit non-zero.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import numpy as np
import torch

from darkmatter.errors import ConfigError, DarkMatterError

T = TypeVar("T")
FAILURES = ".ranks"
TIMEOUT_ENV = "DARKMATTER_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 6 * 3600
"""How long a collective waits for the other ranks. Steps that run on rank 0 alone keep the others at a
barrier for their whole duration; a crashed rank is noticed at once by ``torchrun``, not by this timeout."""


class RankFailedError(DarkMatterError):
    """Another rank of a distributed run failed; this one stops too."""

    exit_code = 1


@dataclass(eq=False)  # hashable by identity, so it can be a dataclass field's default
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    failures: Path | None = field(default=None, repr=False)

    @property
    def active(self) -> bool:
        """Whether more than one process takes part."""
        return self.world > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one that writes shared outputs (manifest, results, figures, report)."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous part of ``items`` (sizes differ by at most one; earlier ranks larger)."""
        start, stop = self.bounds(len(items))
        return list(items[start:stop])

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this rank's part of ``n`` items."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[no-any-return]

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when alone). For small partial
        results (per-context lists, counts, latent records) that are merged in rank order afterwards."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        box: list[Any] = [None] * self.world
        dist.all_gather_object(box, obj)
        return box

    def max_floats(self, values: Sequence[float]) -> list[float]:
        """``values``: the largest across ranks, element by element."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [float(v) for v in t.cpu()]

    def sum_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum ``tensors`` in place across ranks (one collective per dtype); tensors on another device than
        the backend's (``collective_device``) go there and back."""
        if not self.active:
            return
        from darkmatter.stats.distributed import all_reduce_sum_

        here = list(tensors)
        device = self.collective_device
        moved = [t.to(device) for t in here]
        all_reduce_sum_(moved)
        for t, m in zip(here, moved, strict=True):
            if m is not t:
                t.copy_(m)

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """``values`` summed across ranks, in float64."""
        if not self.active:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.collective_device)
        self.sum_([t])
        return [float(v) for v in t.cpu()]

    def rows(self, n: int, width: int, compute: Callable[[int], Sequence[float]]) -> np.ndarray:
        """``[n, width]`` float64: row i is ``compute(i)``. Each rank computes its share of the rows and the
        others' arrive by a sum with zeros (exact), so the array equals the one-process array bit for bit."""
        start, stop = self.bounds(n) if self.active else (0, n)
        out = np.zeros((n, width), dtype=np.float64)
        for i in range(start, stop):
            out[i] = np.asarray(compute(i), dtype=np.float64)
        if self.active:
            self.sum_([torch.from_numpy(out)])  # in place, through the shared memory
        return out

    @property
    def collective_device(self) -> torch.device:
        """Where tensors must be for this backend's collectives."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def label(self) -> str:
        """The prefix of this rank's log lines ('' when alone)."""
        return f"[rank {self.rank}/{self.world}] " if self.active else ""

    # -- failures ------------------------------------------------------------------------------------------
    def watch_failures(self, out: Path) -> None:
        """Record failures under ``out`` and stop with the failing rank's message when ``torchrun`` sends
        SIGTERM (it does when any rank exits non-zero)."""
        if not self.active:
            return
        self.failures = Path(out) / FAILURES
        self.failures.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def clear_failures(self) -> None:
        """Rank 0, before the first barrier of a run: forget the failures of an earlier run."""
        if self.failures is not None and self.failures.is_dir():
            for p in self.failures.glob("failed-*.txt"):
                p.unlink(missing_ok=True)

    def record_failure(self, message: str) -> None:
        """Leave this rank's message where the other ranks look for it."""
        if self.failures is None:
            return
        try:
            path = self.failures / f"failed-{self.rank}.txt"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(message, encoding="utf-8")
            tmp.replace(path)
        except OSError:
            pass

    def failure_elsewhere(self, wait_s: float = 2.0) -> str | None:
        """The first message another rank recorded (waiting up to ``wait_s`` for one to appear)."""
        if self.failures is None:
            return None
        deadline = time.monotonic() + wait_s
        while True:
            found = sorted(
                p for p in self.failures.glob("failed-*.txt") if p.name != f"failed-{self.rank}.txt"
            )
            if found:
                rank = found[0].stem.removeprefix("failed-")
                try:
                    return f"rank {rank} failed: {found[0].read_text(encoding='utf-8').strip()}"
                except OSError:
                    return f"rank {rank} failed"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        reason = self.failure_elsewhere() or "stopped by the launcher (another rank exited)"
        print(f"darkmatter: {self.label()}error: {reason}", file=sys.stderr, flush=True)
        os._exit(1)


SINGLE = Ranks()


def from_environment(device: str) -> Ranks:
    """The ranks ``torchrun`` describes in the environment, joined into a process group; ``SINGLE`` when
    the process was started alone. ``device``: the study's device, which picks the backend (and, on GPUs,
    this rank's ``cuda:LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ConfigError(f"Device {device!r} asked for, but CUDA is not available on rank {rank}.")
        torch.cuda.set_device(local % torch.cuda.device_count())
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=collective_timeout_s()))
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local, backend=backend)


def collective_timeout_s() -> float:
    """``DARKMATTER_DIST_TIMEOUT_S`` (seconds, positive), else ``DEFAULT_TIMEOUT_S``."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return float(DEFAULT_TIMEOUT_S)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds.")
    return value


def shutdown(ranks: Ranks) -> None:
    """Leave the process group (after the last collective)."""
    if ranks.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # no rank leaves while another still talks to it (gloo may abort at exit)
            dist.destroy_process_group()
