"""Figs 12 and 6: distributions over tokens or SAEs, drawn as violins."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.patches import Patch

from darkmatter.errors import ShapeError
from darkmatter.report.figures.inputs import _arr, _finite_range, _same_len
from darkmatter.report.figures.style import (
    GREEN,
    MISSING,
    ORANGE,
    PALETTE,
    _figure,
    _fmt_width,
    _no_data,
    _style_axes,
    _styled,
    save,
)


def _violins(
    ax: Axes,
    samples: Sequence[np.ndarray],
    positions: Sequence[float] | np.ndarray,
    colour: str,
    width: float,
) -> None:
    """Violins with a median tick; samples too small for a density become points."""
    for pos, s in zip(positions, samples, strict=True):
        s = s[np.isfinite(s)]
        if s.size >= 2 and np.ptp(s) > 0:
            parts = ax.violinplot([s], positions=[pos], widths=width, showextrema=False, showmedians=False)
            for body in parts["bodies"]:  # type: ignore[attr-defined]
                body.set_facecolor(colour)
                body.set_edgecolor(colour)
                body.set_alpha(0.45)
            q1, med, q3 = np.percentile(s, [25, 50, 75])
            ax.vlines(pos, q1, q3, color=colour, linewidth=3, alpha=0.9)
            ax.hlines(med, pos - width * 0.2, pos + width * 0.2, color="white", linewidth=1.5, zorder=3)
        elif s.size:
            ax.scatter(np.full(s.size, pos), s, color=colour, s=14, zorder=3)
        else:
            ax.text(pos, 0.5, "n/a", transform=ax.get_xaxis_transform(), ha="center", color=MISSING)


@_styled
def plot_linear_vs_nonlinear_norms(
    widths: Sequence[int],
    linear_norm: Sequence[Sequence[float]],
    nonlinear_norm: Sequence[Sequence[float]],
    out_dir: Path,
    stem: str = "linear_vs_nonlinear_norms",
) -> dict[str, Path]:
    """Fig 12: per-width distributions of per-token ‖LinearError‖ and ‖NonlinearError‖, side by side.

    ``linear_norm[i]`` / ``nonlinear_norm[i]`` are samples (any number, NaN skipped) for ``widths[i]``.
    Violins show the density, the thick bar the interquartile range, the white tick the median.
    """
    _same_len("widths", len(widths), linear_norm=linear_norm, nonlinear_norm=nonlinear_norm)
    lin = [_arr(s, f"linear_norm[{i}]") for i, s in enumerate(linear_norm)]
    nonlin = [_arr(s, f"nonlinear_norm[{i}]") for i, s in enumerate(nonlinear_norm)]
    n = len(widths)
    fig = _figure(max(5.5, 1.0 * n + 2.5), 4.2)
    ax = fig.subplots()
    pos = np.arange(n, dtype=float)
    _violins(ax, lin, pos - 0.2, ORANGE, 0.38)
    _violins(ax, nonlin, pos + 0.2, GREEN, 0.38)
    ax.set_xticks(pos, [_fmt_width(float(w)) for w in widths])
    ax.set_xlim(-0.7, max(n, 1) - 0.3)
    _style_axes(
        ax,
        "Per-token norms of the linear and nonlinear SAE error components, by width",
        "SAE width (number of latents)",
        "Per-token error norm (L2, activation units)",
    )
    ax.legend(
        handles=[
            Patch(color=ORANGE, alpha=0.6, label="‖LinearError‖"),
            Patch(color=GREEN, alpha=0.6, label="‖NonlinearError‖"),
        ],
        loc="best",
    )
    if not n:
        _no_data(ax)
    return save(fig, out_dir, stem)


@_styled
def plot_norm_prediction_violins(
    quantities: Sequence[str],
    r2_by_quantity: Mapping[str, Sequence[float]],
    out_dir: Path,
    stem: str = "norm_prediction",
) -> dict[str, Path]:
    """Fig 6: for each quantity q, the R² over SAEs of predicting ‖q‖² linearly from x.

    ``r2_by_quantity[q]`` holds one R² per SAE (NaN skipped). Each violin is overlaid with the individual
    SAEs as jittered points (fixed seed), since there may be only a handful of SAEs.
    """
    missing = [q for q in quantities if q not in r2_by_quantity]
    if missing:
        raise ShapeError(f"r2_by_quantity has no entry for {missing}; give one list of R² per quantity.")
    data = [_arr(r2_by_quantity[q], f"r2_by_quantity[{q!r}]") for q in quantities]
    n = len(quantities)
    fig = _figure(max(5.5, 1.15 * n + 2.0), 4.2)
    ax = fig.subplots()
    pos = np.arange(n, dtype=float)
    rng = np.random.default_rng(0)
    for i, d in enumerate(data):
        colour = PALETTE[i % len(PALETTE)]
        _violins(ax, [d], [pos[i]], colour, 0.7)
        f = d[np.isfinite(d)]
        ax.scatter(
            pos[i] + rng.uniform(-0.12, 0.12, f.size),
            f,
            s=12,
            color=colour,
            edgecolors="black",
            linewidths=0.4,
            alpha=0.85,
            zorder=4,
        )
    labels = [f"{q}\n(n={int(np.isfinite(d).sum())})" for q, d in zip(quantities, data, strict=True)]
    ax.set_xticks(pos, labels)
    ax.set_xlim(-0.6, max(n, 1) - 0.4)
    _style_axes(
        ax,
        "Linear predictability of each component's squared norm from x, over SAEs",
        "Quantity q",
        "Test R² of x → ‖q‖²",
    )
    if _finite_range(*data) is None:
        _no_data(ax)
    return save(fig, out_dir, stem)
