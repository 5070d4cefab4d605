"""Fig 2: how predictable the SAE error is from the input, mapped over SAE width × L0."""

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


@dataclass(frozen=True)
class _SaeGrid:
    """The SAEs that can be placed on log axes (positive, finite width and L0) and how they are laid out."""

    ok: np.ndarray  # which input SAEs are placed
    w: np.ndarray  # widths of the placed SAEs
    l0: np.ndarray  # their L0s
    uw: np.ndarray  # distinct widths, ascending
    ul: np.ndarray  # distinct L0s, ascending
    pairs: dict[tuple[float, float], int]  # (width, L0) -> index into w / l0
    full: bool  # every width × L0 combination occurs exactly once (contours can be drawn)

    @property
    def small(self) -> bool:
        """Few enough SAEs for large markers and readable labels."""
        return len(self.w) <= 24


def _sae_grid(widths: np.ndarray, l0s: np.ndarray) -> _SaeGrid:
    ok = np.isfinite(widths) & np.isfinite(l0s) & (widths > 0) & (l0s > 0)
    w, l0 = widths[ok], l0s[ok]
    uw, ul = np.unique(w), np.unique(l0)
    pairs = {(a, b): i for i, (a, b) in enumerate(zip(w, l0, strict=True))}
    full = len(uw) >= 2 and len(ul) >= 2 and len(pairs) == len(w) == len(uw) * len(ul)
    return _SaeGrid(ok, w, l0, uw, ul, pairs, full)


def _contour_grid(ax: Axes, grid: _SaeGrid, v: np.ndarray, cmap: Colormap, norm: Normalize) -> None:
    """Filled contours of ``v`` over the full width × L0 grid (NaN cells left out)."""
    Z = np.full((len(grid.ul), len(grid.uw)), np.nan)
    for (a, b), i in grid.pairs.items():
        Z[np.searchsorted(grid.ul, b), np.searchsorted(grid.uw, a)] = v[i]
    levels = np.linspace(cast(float, norm.vmin), cast(float, norm.vmax), 13)
    ax.contourf(grid.uw, grid.ul, np.ma.masked_invalid(Z), levels=levels, cmap=cmap, norm=norm, alpha=0.85)


def _scatter_values(ax: Axes, grid: _SaeGrid, v: np.ndarray, cmap: Colormap, norm: Normalize) -> None:
    """One marker per SAE coloured by ``v`` (NaN: grey ring), each annotated with its value."""
    fin = np.isfinite(v)
    size = 70 if grid.small else 28
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
    for a, b, val in zip(grid.w, grid.l0, v, strict=True):
        ax.annotate(
            "NaN" if not math.isfinite(val) else f"{val:.3f}",
            (a, b),
            xytext=(5, 4),
            textcoords="offset points",
            fontsize=7 if grid.small else 5.5,
            zorder=4,
            bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
        )


def _fit_limits(ax: Axes, grid: _SaeGrid) -> None:
    """Pad the limits around the placed SAEs and tick the measured L0s when they are few and spread out."""
    if not len(grid.w):
        _no_data(ax, "no SAE with a positive width and L0")
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
) -> None:
    """One metric's panel: contours (full grid only), markers, labels, colour bar and log2 axes."""
    cmap, norm = _cmap(), _norm(_finite_range(v))
    missing = ~np.isfinite(v)
    if grid.full and (~missing).sum() >= 3:
        _contour_grid(ax, grid, v, cmap, norm)
    _scatter_values(ax, grid, v, cmap, norm)
    fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=cbar_label, shrink=0.9)
    _style_axes(ax, title, "SAE width (number of latents)", "L0 (mean active latents per token)", "both")
    _log2_axis(ax, "x")
    _log2_axis(ax, "y", lambda t: f"{t:.3g}")
    _fit_limits(ax, grid)
    if missing.any():
        ax.legend(loc="lower left")


@_styled
def plot_error_prediction_maps(
    widths: Sequence[int],
    l0s: Sequence[float],
    norm_r2: Sequence[float],
    vector_r2: Sequence[float],
    fvu_nonlinear: Sequence[float],
    out_dir: Path,
    stem: str = "error_prediction_maps",
) -> dict[str, Path]:
    """Fig 2: norm-probe R², vector-probe R² and FVU_nonlinear over SAE width × L0, one panel each.

    One entry per SAE in every list: ``widths[i]`` latents, mean ``l0s[i]`` active latents, and its three
    metrics. Points are placed on log2(width) × log(L0) axes, coloured and annotated by value; a full
    width × L0 grid also gets filled contours. NaN metrics are drawn as grey rings; SAEs with a
    non-positive or NaN width or L0 cannot be placed and are skipped.
    """
    w, l0 = _arr(widths, "widths"), _arr(l0s, "l0s")
    panels = [
        ("Norm probe: R² of ‖SaeError‖ from x", _arr(norm_r2, "norm_r2"), "test R²"),
        ("Vector probe: R² of SaeError from x", _arr(vector_r2, "vector_r2"), "test R²"),
        (
            r"FVU$_\mathrm{nonlinear}$ = FVU of Sae(x) + x·b*",
            _arr(fvu_nonlinear, "fvu_nonlinear"),
            "FVU (fraction)",
        ),
    ]
    _same_len(
        "widths", len(w), l0s=l0, norm_r2=panels[0][1], vector_r2=panels[1][1], fvu_nonlinear=panels[2][1]
    )
    grid = _sae_grid(w, l0)
    fig = _figure(13.5, 4.3)
    axes = fig.subplots(1, 3)
    for ax, (title, values, cbar_label) in zip(axes, panels, strict=True):
        _draw_map_panel(fig, ax, grid, values[grid.ok], title, cbar_label)
    fig.suptitle("How much of the SAE error is linearly predictable from the input, per SAE (width × L0)")
    return save(fig, out_dir, stem)
