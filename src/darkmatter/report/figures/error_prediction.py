"""Fig 2: the SAE error and how predictable it is from the input, mapped over SAE width × L0.

Four maps, as the paper draws them: FVU, the error-vector probe's R², the error-norm probe's R² and
FVU_nonlinear. Each metric is interpolated linearly between the SAEs (``scipy.interpolate.griddata`` in raw
width and L0 coordinates, onto a 100 × 100 log-spaced grid), drawn as 15 filled contour levels on log-log
axes, with a dot at every SAE. Too few distinct widths or L0s, collinear SAEs or NaNs leave markers only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator
from scipy.interpolate import griddata
from scipy.spatial import QhullError

from darkmatter.report.figures.inputs import _arr, _finite_range, _same_len
from darkmatter.report.figures.style import (
    MISSING,
    _cmap,
    _figure,
    _log2_axis,
    _no_data,
    _norm,
    _style_axes,
    _styled,
    save,
)

GRID_POINTS = 100
"""Interpolation grid: this many log-spaced points along width and along L0."""
CONTOUR_LEVELS = 15
"""Filled contour levels per map."""
MIN_DISTINCT = 3
"""Contours need at least this many distinct widths and distinct L0s among the finite values."""


@dataclass(frozen=True)
class _SaeGrid:
    """The SAEs that can be placed on log axes (positive, finite width and L0)."""

    ok: np.ndarray  # which input SAEs are placed
    w: np.ndarray  # widths of the placed SAEs
    l0: np.ndarray  # their L0s
    uw: np.ndarray  # distinct widths, ascending
    ul: np.ndarray  # distinct L0s, ascending

    @property
    def small(self) -> bool:
        """Few enough SAEs for large markers and readable value labels."""
        return len(self.w) <= 24


def _sae_grid(widths: np.ndarray, l0s: np.ndarray) -> _SaeGrid:
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(widths) & np.isfinite(l0s) & (widths > 0) & (l0s > 0)
    w, l0 = widths[ok], l0s[ok]
    return _SaeGrid(ok, w, l0, np.unique(w), np.unique(l0))


def _interpolate(grid: _SaeGrid, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``v`` interpolated linearly between the SAEs with a finite value, on a log-spaced grid.

    As in the paper, the triangulation is in raw (not log) width and L0 coordinates. None when there is
    nothing to interpolate: fewer than ``MIN_DISTINCT`` distinct widths or L0s, or collinear points.
    """
    fin = np.isfinite(v)
    w, l0, z = grid.w[fin], grid.l0[fin], v[fin]
    if len(np.unique(w)) < MIN_DISTINCT or len(np.unique(l0)) < MIN_DISTINCT:
        return None
    gw, gl = np.meshgrid(
        np.geomspace(w.min(), w.max(), GRID_POINTS), np.geomspace(l0.min(), l0.max(), GRID_POINTS)
    )
    try:
        gz = griddata(np.column_stack([w, l0]), z, (gw, gl), method="linear")
    except (QhullError, ValueError):  # collinear or otherwise degenerate points: no triangle to fill
        return None
    gz = np.asarray(gz, dtype=float)
    if np.isfinite(gz).sum() < 4:
        return None
    return gw, gl, gz


def _contours(ax: Axes, grid: _SaeGrid, v: np.ndarray, cmap: Colormap, norm: Normalize) -> bool:
    """Filled contours of ``v`` over width × L0; False (nothing drawn) when it cannot be interpolated."""
    surface = _interpolate(grid, v)
    if surface is None:
        return False
    gw, gl, gz = surface
    levels = np.linspace(cast(float, norm.vmin), cast(float, norm.vmax), CONTOUR_LEVELS + 1)
    ax.contourf(gw, gl, np.ma.masked_invalid(gz), levels=levels, cmap=cmap, norm=norm)
    return True


def _scatter_values(
    ax: Axes, grid: _SaeGrid, v: np.ndarray, cmap: Colormap, norm: Normalize, contoured: bool
) -> None:
    """One mark per SAE: a black dot over contours, else a marker coloured by ``v``; NaN: a grey ring.

    Values are written next to the marks when the SAEs are few.
    """
    fin = np.isfinite(v)
    size = 70 if grid.small else 28
    if contoured:
        ax.scatter(grid.w[fin], grid.l0[fin], s=10 if grid.small else 6, c="black", zorder=3)
    else:
        ax.scatter(
            grid.w[fin],
            grid.l0[fin],
            c=v[fin],
            cmap=cmap,
            norm=norm,
            s=size,
            edgecolors="black",
            linewidths=0.6,
            zorder=3,
        )
    ax.scatter(
        grid.w[~fin],
        grid.l0[~fin],
        s=size,
        facecolors="none",
        edgecolors=MISSING,
        linewidths=1.2,
        zorder=3,
        label="NaN" if (~fin).any() else None,
    )
    if not grid.small:
        return
    for a, b, val in zip(grid.w, grid.l0, v, strict=True):
        ax.annotate(
            "NaN" if not math.isfinite(val) else f"{val:.3f}",
            (a, b),
            xytext=(5, 4),
            textcoords="offset points",
            fontsize=7,
            zorder=4,
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
        )


def _fit_limits(ax: Axes, grid: _SaeGrid) -> None:
    """Pad the limits around the placed SAEs and tick the measured L0s when they are few and spread out."""
    if not len(grid.w):
        _no_data(ax, "no SAE with a positive width and L0")
        ax.set_xlim(2**10, 2**20)  # log axes need positive limits even with nothing on them
        ax.set_ylim(1, 1000)
        return
    ul = grid.ul
    ax.set_xlim(grid.uw.min() / 1.6, grid.uw.max() * 1.6)
    ax.set_ylim(ul.min() / 1.4, ul.max() * 1.4)
    # label the measured L0s themselves unless neighbours would overlap (empirical L0s cluster)
    if len(ul) <= 10 and (len(ul) < 2 or np.diff(np.log(ul)).min() > np.log(1.25)):
        ax.set_yticks(ul, [f"{x:.3g}" for x in ul])
        ax.yaxis.set_minor_locator(NullLocator())


def _draw_map_panel(
    fig: Figure, ax: Axes, grid: _SaeGrid, v: np.ndarray, title: str, cbar_label: str
) -> bool:
    """One metric's map: contours where they can be interpolated, marks, colour bar, log2 axes.

    Returns whether contours were drawn.
    """
    cmap, norm = _cmap(), _norm(_finite_range(v))
    contoured = _contours(ax, grid, v, cmap, norm)
    _scatter_values(ax, grid, v, cmap, norm, contoured)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=cbar_label, shrink=0.9)
    _style_axes(ax, title, "SAE width (number of latents)", "L0 (mean active latents per token)", "both")
    _log2_axis(ax, "x")
    _log2_axis(ax, "y", lambda t: f"{t:.3g}")
    _fit_limits(ax, grid)
    if (~np.isfinite(v)).any():
        ax.legend(loc="lower left")
    return contoured


MAP_TITLES = (
    "FVU of Sae(x)",
    "Vector probe: R² of SaeError from x",
    "Norm probe: R² of ‖SaeError‖² from x",
    r"FVU$_\mathrm{nonlinear}$ = FVU of Sae(x) + x·b*",
)
"""The four panels of Fig 2, in order."""


@_styled
def plot_error_prediction_maps(
    widths: Sequence[int],
    l0s: Sequence[float],
    fvu: Sequence[float],
    vector_r2: Sequence[float],
    norm_r2: Sequence[float],
    fvu_nonlinear: Sequence[float],
    out_dir: Path,
    stem: str = "error_prediction_maps",
) -> dict[str, Path]:
    """Fig 2: FVU, vector-probe R², norm-probe R² and FVU_nonlinear over SAE width × L0, one map each.

    One entry per SAE in every list: ``widths[i]`` latents, mean ``l0s[i]`` active latents, and its four
    metrics. Each map interpolates its metric linearly between the SAEs (raw coordinates, log-spaced
    100 × 100 grid, 15 filled contour levels) on log2 axes, with a black dot at each SAE; where it cannot
    be interpolated (fewer than 3 distinct widths or L0s with a finite value, collinear SAEs) the SAEs are
    drawn as markers coloured by value. Few SAEs are also annotated with their values. NaN metrics are
    grey rings; SAEs with a non-positive or NaN width or L0 cannot be placed and are skipped.
    """
    w, l0 = _arr(widths, "widths"), _arr(l0s, "l0s")
    values = {
        "fvu": _arr(fvu, "fvu"),
        "vector_r2": _arr(vector_r2, "vector_r2"),
        "norm_r2": _arr(norm_r2, "norm_r2"),
        "fvu_nonlinear": _arr(fvu_nonlinear, "fvu_nonlinear"),
    }
    _same_len("widths", len(w), l0s=l0, **values)
    labels = ("FVU (fraction)", "test R²", "test R²", "FVU (fraction)")
    grid = _sae_grid(w, l0)
    fig = _figure(11.0, 8.6)
    axes = fig.subplots(2, 2).ravel()
    for ax, title, v, label in zip(axes, MAP_TITLES, values.values(), labels, strict=True):
        _draw_map_panel(fig, ax, grid, v[grid.ok], title, label)
    fig.suptitle("The SAE error and how much of it is linearly predictable from the input, over width × L0")
    return save(fig, out_dir, stem)
