"""When is an SAE trained enough? The convergence criterion on its validation-FVU curve.

Criterion: over the last quarter of the run's steps *before the learning rate starts to decay*, the validation
FVU (held-out tokens, ``darkmatter.sae.validation``) changed by at most ``tol``, relative:
``|FVU(start) − FVU(end)| / FVU(end) ≤ tol`` with ``end = (1 − decay_fraction)·T`` steps done and
``start = end − T/4`` (T the run's steps; with no decay, the run's last quarter). FVUs at the two marks are
interpolated linearly between measurements; the trainer measures exactly there.

Why not the last quarter of the run: the linear decay to zero (the last ``decay_fraction`` of steps) lowers
the validation FVU by 8-13% on the demo however long the run is (4, 8 or 16 epochs; ``bench/README.md``),
so a last-quarter window measures the annealing, which more training does not remove, and no run of that
schedule would meet a 1% tolerance. The plateau before the decay is what more steps of the same schedule
would improve. A rise of the validation FVU (over-fitting a small train split) fails the criterion too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from darkmatter.sae.train_config import TrainingPoint

WINDOW = 0.25  # a quarter of the run's steps


@dataclass(frozen=True)
class Convergence:
    """``change``: (FVU at the window's start − FVU at its end) / FVU at its end, > 0 while improving."""

    change: float
    converged: bool
    tol: float


def window(total_steps: float, decay_fraction: float) -> tuple[float, float]:
    """(start, end) of the criterion's window in steps done; start < 0 when the run has no such window."""
    end = (1 - decay_fraction) * total_steps
    return end - WINDOW * total_steps, end


def window_steps(total_steps: int, decay_fraction: float) -> tuple[int, int]:
    """0-based indices of the steps after which the window starts and ends (where the trainer measures)."""
    start, end = window(total_steps, decay_fraction)
    return max(0, round(start) - 1), max(0, round(end) - 1)


def convergence(
    history: Iterable[TrainingPoint | Mapping[str, float | None]], tol: float, decay_fraction: float
) -> Convergence | None:
    """The criterion on a training history whose last validation point is the run's last step; None when
    its validation points do not span the window. Step ``s`` of the history means ``s + 1`` steps done."""
    points = [p if isinstance(p, TrainingPoint) else TrainingPoint.model_validate(p) for p in history]
    done = np.array([p.step + 1 for p in points if p.val_fvu is not None], dtype=np.float64)
    val = np.array([p.val_fvu for p in points if p.val_fvu is not None], dtype=np.float64)
    if len(done) < 2:
        return None
    order = np.argsort(done, kind="stable")
    done, val = done[order], val[order]
    start, end = window(done[-1], decay_fraction)
    if start < 0 or done[0] > start + 0.5:  # half a step: the trainer rounds the marks to whole steps
        return None
    at_start, at_end = (float(np.interp(t, done, val)) for t in (start, end))
    change = (at_start - at_end) / max(at_end, 1e-12)
    return Convergence(change=change, converged=abs(change) <= tol, tol=tol)
