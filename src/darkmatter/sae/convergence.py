"""When is an SAE trained enough? The convergence criterion on its validation-FVU curve.

Criterion: the validation FVU (held-out tokens, ``darkmatter.sae.validation``) changed by at most ``tol``
(relative) over the last quarter of training: ``|FVU(3/4 of the steps) − FVU(end)| / FVU(end) ≤ tol``. The
FVU at the 3/4 mark is interpolated linearly between measurements (the trainer measures exactly there).
The window includes the learning-rate decay, so a converged SAE gains little even from annealing. A rise of
the validation FVU (over-fitting a small train split) fails the criterion as a fall does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from darkmatter.sae.train_config import TrainingPoint

WINDOW = 0.25  # the last quarter of training


@dataclass(frozen=True)
class Convergence:
    """``change``: (FVU at the window's start − final FVU) / final FVU, > 0 while still improving."""

    change: float
    converged: bool
    tol: float


def window_start(total_steps: int) -> int:
    """The 0-based index of the step after which the last ``WINDOW`` of a run of ``total_steps`` begins."""
    return max(0, round((1 - WINDOW) * total_steps) - 1)


def convergence(
    history: Iterable[TrainingPoint | Mapping[str, float | None]], tol: float
) -> Convergence | None:
    """The criterion on a training history; None when too few validation points (fewer than two, or none at
    or before the window's start). Steps count from 0; step ``s`` means ``s + 1`` steps done."""
    points = [p if isinstance(p, TrainingPoint) else TrainingPoint.model_validate(p) for p in history]
    done = np.array([p.step + 1 for p in points if p.val_fvu is not None], dtype=np.float64)
    val = np.array([p.val_fvu for p in points if p.val_fvu is not None], dtype=np.float64)
    if len(done) < 2:
        return None
    order = np.argsort(done, kind="stable")
    done, val = done[order], val[order]
    mark = (1 - WINDOW) * done[-1]
    if done[0] > mark + 1e-9:
        return None
    at_mark = float(np.interp(mark, done, val))
    end = float(val[-1])
    change = (at_mark - end) / max(end, 1e-12)
    return Convergence(change=change, converged=abs(change) <= tol, tol=tol)
