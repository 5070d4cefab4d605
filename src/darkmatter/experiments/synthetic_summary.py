"""Summaries of the synthetic test's scores: the grid, Table 1's correlations and the Fig 15 curve shapes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import norm as _normal

from darkmatter.experiments.synthetic_moments import Scores

CURVED_ABOVE = 0.5
"""A curve counts as "curved" when the quadratic term is more than this share of its fitted change."""
FLAT_BELOW = 0.25
"""FVU_lin counts as "flat" in p when it leaves less than this share of the ablated variance unrecovered.

The paper's App. D contrast: with real SAE latents the probe wins back the absent features (flat); with
random directions it cannot, and FVU_lin rises with FVU_rec."""
FIG15_SETTINGS = ((0.0, 0.0), (1.0, 0.6), (0.6, 1.0), (2.0, 2.0))


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / den) if den > 0 else float("nan")


def curve_shape(ablation: Sequence[float], fvu: Sequence[float]) -> dict[str, Any]:
    """Quadratic fit f ≈ c0 + c1·q + c2·q², with q = p − p_min, and how curved that fit is.

    ``curvature_ratio`` = |c2|Q² / (|c1|Q + |c2|Q²) over the range Q. It is 0 for a line, 1 for a parabola
    with its vertex at p_min, and 0.5 for one with its vertex mid-range. ``linear_r2`` is the R² of a
    straight line. A curve whose fitted change is below 1e-9 (relative) counts as linear.
    """
    p, f = np.asarray(ablation, dtype=np.float64), np.asarray(fvu, dtype=np.float64)
    q = p - p.min()
    span = float(q.max())
    c2, c1, c0 = (float(v) for v in np.polyfit(q, f, 2))
    bend, slope = abs(c2) * span**2, abs(c1) * span
    tiny = 1e-9 * (1.0 + float(np.abs(f).mean()))
    ratio = bend / (bend + slope) if bend + slope > tiny else 0.0
    line = np.polyval(np.polyfit(q, f, 1), q)
    ss_tot = float(((f - f.mean()) ** 2).sum())
    r2 = 1 - float(((f - line) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    shape = "curved" if ratio > CURVED_ABOVE else "linear"
    return {"c0": c0, "c1": c1, "c2": c2, "curvature_ratio": ratio, "linear_r2": r2, "shape": shape}


def _curve(scores: Scores, sa: float, sr: float, ablations: list[float]) -> dict[str, Any]:
    rec = [scores[(sa, sr, i)][0] for i in range(len(ablations))]
    lin = [scores[(sa, sr, i)][1] for i in range(len(ablations))]
    curve: dict[str, Any] = {
        "sigma_act": sa,
        "sigma_rec": sr,
        "ablation": list(ablations),
        "fvu_rec": rec,
        "fvu_lin": lin,
    }
    if len(ablations) >= 3:
        rise = rec[-1] - rec[0]
        shape_lin = curve_shape(ablations, lin)
        # the share of the variance removed by ablation that the probe does not win back
        share = (lin[-1] - lin[0]) / rise if rise > 0 else float("nan")
        if not math.isfinite(share):
            verdict = shape_lin["shape"]
        elif abs(share) < FLAT_BELOW:
            verdict = "flat"
        else:
            verdict = f"{'rising' if share > 0 else 'falling'} ({shape_lin['shape']})"
        curve |= {
            "shape_rec": curve_shape(ablations, rec),
            "shape_lin": shape_lin,
            "unrecovered_share": share,
            "lin_verdict": verdict,
        }
    return curve


def summarise(
    scores: Scores,
    settings: list[tuple[float, float]],
    ablations: list[float],
    counts: list[int],
    levels: list[float],
) -> dict[str, Any]:
    """The SimulationOutcome fields that come from the scores: grid, Table 1, curves, floor."""
    grid = [
        {
            "sigma_act": sa,
            "sigma_rec": sr,
            "ablation": p,
            "n_ablated": float(c),
            "fvu_rec": scores[(sa, sr, i)][0],
            "fvu_lin": scores[(sa, sr, i)][1],
        }
        for sa, sr in settings
        for i, (p, c) in enumerate(zip(ablations, counts, strict=True))
    ]
    pairs = [(sa, sr) for sa in levels for sr in levels]
    fr = [scores[(sa, sr, 0)] for sa, sr in pairs]  # ablations[0] == 0
    dense, intro = [rec - lin for rec, lin in fr], [lin for _, lin in fr]
    table = [[pearson(v, dense), pearson(v, intro)] for v in ([a for a, _ in pairs], [r for _, r in pairs])]
    ok = bool(min(table[0][0], table[1][1]) > max(abs(table[0][1]), abs(table[1][0])))  # False with NaN
    curves = [_curve(scores, sa, sr, ablations) for sa, sr in FIG15_SETTINGS if (sa, sr) in settings]
    floor = scores[(0.0, 0.0, 0)][0] if (0.0, 0.0) in settings else None
    table1 = [[v if math.isfinite(v) else None for v in row] for row in table]  # JSON has no NaN
    intervals = [[correlation_interval(v, len(pairs)) for v in row] for row in table1]
    return {
        "grid": grid,
        "table1": table1,
        "table1_intervals": intervals,
        "diagonal_ok": ok,
        "curves": curves,
        "fvu_floor": floor,
    }


def correlation_interval(r: float | None, n: int, level: float = 0.95) -> list[float] | None:
    """Fisher-z interval ``tanh(atanh r ± z/√(n − 3))`` of a Pearson r over ``n`` points (None: undefined)."""
    if r is None or not math.isfinite(r) or abs(r) >= 1.0 or n < 4:
        return None
    z = float(_normal.ppf(0.5 + level / 2)) / math.sqrt(n - 3)
    return [math.tanh(math.atanh(r) - z), math.tanh(math.atanh(r) + z)]
