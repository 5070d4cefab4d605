"""Delete-one-block jackknife intervals: a statistic recomputed with each block of contexts left out.

Blocks are groups of whole contexts, so tokens of one context (which are correlated) never fall on both
sides. Each replicate refits whatever the statistic fits (a probe, a power law) on the remaining blocks,
so the interval includes the fit's own variance, not only the evaluation's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy import stats as _scipy_stats

LEVEL = 0.95


def jackknife_interval(
    point: float, replicates: Sequence[float], level: float = LEVEL
) -> tuple[float, float]:
    """``point ± t·se``, the delete-one jackknife standard error of ``replicates`` (one per block left out).

    NaN ends when fewer than 3 replicates are finite (too few blocks for an interval).
    """
    values = [float(v) for v in replicates if math.isfinite(v)]
    b = len(values)
    if b < 3 or not math.isfinite(point):
        return math.nan, math.nan
    mean = sum(values) / b
    se = math.sqrt((b - 1) / b * sum((v - mean) ** 2 for v in values))
    t = float(_scipy_stats.t.ppf(0.5 + level / 2, b - 1))
    return point - t * se, point + t * se


def finite_interval(point: float, replicates: Sequence[float], level: float = LEVEL) -> list[float] | None:
    """``[low, high]`` from :func:`jackknife_interval`, or None when it has no finite ends."""
    low, high = jackknife_interval(point, replicates, level)
    return [low, high] if math.isfinite(low) and math.isfinite(high) else None
