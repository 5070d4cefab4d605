"""Fig 1: SAE FVU against width, its power-law fit and the stacked decomposition of the SAE error."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes

from darkmatter.report.figures.inputs import _arr, _finite_range, _same_len
from darkmatter.report.figures.style import (
    BLACK,
    BLUE,
    GREEN,
    ORANGE,
    PURPLE,
    SKY,
    VERMILION,
    _figure,
    _log2_axis,
    _no_data,
    _style_axes,
    _styled,
    save,
)

_BAND_STYLE = {
    "absent": (SKY, "Absent features (not yet learned; fit − c)", 0.35),
    "linear": (ORANGE, "Linear error (dense / not learned linearly; c − FVU$_\\mathrm{nonlinear}$)", 0.35),
    "linear+absent": (ORANGE, "Linear error + absent features (no fit)", 0.35),
    "encoder": (PURPLE, "Encoder error (SAE − pursuit FVU$_\\mathrm{nonlinear}$)", 0.6),
    "nonlinear": (GREEN, "Nonlinear error", 0.3),
}


def _fit_label(prefix: str, fit: Mapping[str, float], ci: Mapping[str, Any] | None) -> str:
    """Legend text for a power-law fit, with ± half-widths of the intervals in ``ci`` where finite."""
    c, a, m = (float(fit[k]) for k in ("c", "a", "m"))
    label = f"{prefix}FVU ≈ {c:.3f} + {a:.3f}·$W^{{-{m:.3f}}}$"
    if ci:
        parts = []
        for k, v in (("c", c), ("a", a), ("m", m)):
            b = ci.get(k) or {}
            lo, hi = float(b.get("low", math.nan)), float(b.get("high", math.nan))
            if math.isfinite(lo) and math.isfinite(hi):
                parts.append(f"{k} = {v:.3f} ± {(hi - lo) / 2:.3f}")
        if parts:
            label += "\n(" + ", ".join(parts) + ")"
    return label


def _fit_ok(fit: Mapping[str, float] | None) -> bool:
    """Whether ``fit`` has finite ``c``, ``a`` and ``m``."""
    try:
        return fit is not None and all(math.isfinite(float(fit[k])) for k in ("c", "a", "m"))
    except (KeyError, TypeError, ValueError):
        return False


def _fit_curve(fit: Mapping[str, float], xs: np.ndarray) -> tuple[float, np.ndarray]:
    """The asymptote ``c`` and the curve c + a·xs^(−m)."""
    c, a, m = (float(fit[k]) for k in ("c", "a", "m"))
    return c, c + a * xs ** (-m)


def _interp_logx(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray | None:
    """Piecewise-linear in log(x) through the finite points; flat beyond the ends; None if none."""
    ok = np.isfinite(xp) & np.isfinite(fp) & (xp > 0)
    if not ok.any():
        return None
    order = np.argsort(xp[ok])
    return np.interp(np.log(x), np.log(xp[ok][order]), fp[ok][order])


def decomposition_bands(
    shape: tuple[int, ...], top: np.ndarray | None, c: float, nl: float, pursuit_nl: np.ndarray | None
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """Fig 1's stacked bands as ``(key, lower, upper)`` with ``upper >= lower`` everywhere (NaN = gap).

    ``top`` is the FVU curve (fit, or interpolated data), ``c`` the fitted asymptote (NaN: no fit),
    ``nl`` the FVU_nonlinear level (NaN: unknown) and ``pursuit_nl`` the pursuit FVU_nonlinear level.
    Each boundary is clipped into the one above it, so c < FVU_nonlinear gives an empty linear band.
    """
    bands: list[tuple[str, np.ndarray, np.ndarray]] = []

    def add(key: str, lo: Any, hi: Any) -> None:
        lo_a = np.broadcast_to(np.asarray(lo, dtype=float), shape)
        bands.append((key, lo_a, np.maximum(np.broadcast_to(np.asarray(hi, dtype=float), shape), lo_a)))

    has_fit = math.isfinite(c) and top is not None
    if not math.isfinite(nl):
        if has_fit:
            add("absent", c, top)
        return bands
    lo_nl = np.full(shape, nl) if top is None else np.minimum(nl, top)
    lo_nl = np.where(np.isfinite(lo_nl), lo_nl, nl)
    if has_fit:
        lin_top = np.maximum(c, lo_nl)
        add("absent", lin_top, top)
        add("linear", lo_nl, lin_top)
    elif top is not None:
        add("linear+absent", lo_nl, top)
    enc_lo = lo_nl if pursuit_nl is None else np.minimum(pursuit_nl, lo_nl)
    if pursuit_nl is not None:
        add("encoder", enc_lo, lo_nl)
    add("nonlinear", 0.0, enc_lo)
    return bands


@dataclass(frozen=True)
class _Measured:
    """Per-SAE inputs of Fig 1 as float arrays of one length (pursuit ones None when not given)."""

    W: np.ndarray  # widths
    y: np.ndarray  # FVU of Sae(x)
    ynl: np.ndarray  # FVU_nonlinear
    py: np.ndarray | None  # gradient-pursuit FVU
    pnl: np.ndarray | None  # gradient-pursuit FVU_nonlinear


def _measured(
    widths: Sequence[int],
    fvu: Sequence[float],
    fvu_nonlinear: Sequence[float],
    pursuit_fvu: Sequence[float] | None,
    pursuit_nonlinear: Sequence[float] | None,
) -> _Measured:
    """Convert and length-check the per-SAE inputs (``ShapeError`` on a mismatch)."""
    W, y, ynl = _arr(widths, "widths"), _arr(fvu, "fvu"), _arr(fvu_nonlinear, "fvu_nonlinear")
    _same_len("widths", len(W), fvu=y, fvu_nonlinear=ynl)
    py = _arr(pursuit_fvu, "pursuit_fvu") if pursuit_fvu is not None else None
    pnl = _arr(pursuit_nonlinear, "pursuit_nonlinear") if pursuit_nonlinear is not None else None
    _same_len(
        "widths",
        len(W),
        **{k: v for k, v in (("pursuit_fvu", py), ("pursuit_nonlinear", pnl)) if v is not None},
    )
    return _Measured(W, y, ynl, py, pnl)


@dataclass(frozen=True)
class _WidthGrid:
    """Widths at which curves and bands are evaluated."""

    xs: np.ndarray  # 400 log-spaced widths, from below the smallest SAE to ``extend`` × the largest
    inside: np.ndarray  # xs up to the largest measured width (solid curves; dotted beyond)
    measured: np.ndarray  # xs within the measured widths


def _width_grid(W: np.ndarray, extend: float) -> _WidthGrid | None:
    """The evaluation grid around the positive widths; None when there are none."""
    good = W[np.isfinite(W) & (W > 0)]
    if good.size == 0:
        return None
    w_lo, w_hi = good.min(), good.max()
    xs = np.geomspace(w_lo / 1.3, w_hi * max(extend, 1.0), 400)
    inside = xs <= w_hi * (1 + 1e-9)
    return _WidthGrid(xs, inside, (xs >= w_lo) & inside)


def _nonlinear_level(nonlinear_mean: float, ynl: np.ndarray) -> float:
    """``nonlinear_mean``, or the mean of the finite FVU_nonlinear values when it is NaN or None."""
    nl = float(nonlinear_mean) if nonlinear_mean is not None else math.nan
    if not math.isfinite(nl) and np.isfinite(ynl).any():
        nl = float(np.nanmean(ynl))
    return nl


def _fvu_top(
    grid: _WidthGrid, data: _Measured, fit: Mapping[str, float] | None
) -> tuple[float, np.ndarray | None]:
    """``(c, curve)``: the power-law fit, or (NaN, the data interpolated over the measured widths only)."""
    if _fit_ok(fit):
        assert fit is not None
        return _fit_curve(fit, grid.xs)
    top = _interp_logx(grid.xs, data.W, data.y)
    if top is not None:  # without a fit, only the measured range is known
        top = np.where(grid.measured, top, np.nan)
    return math.nan, top


def _draw_bands(
    ax: Axes, xs: np.ndarray, top: np.ndarray | None, c: float, nl: float, p_level: np.ndarray | None
) -> None:
    """The stacked decomposition bands (empty ones skipped) and the mean FVU_nonlinear line."""
    for key, lo, hi in decomposition_bands(xs.shape, top, c, nl, p_level):
        if not np.nan_to_num(hi - lo).any():  # an empty band (e.g. c < FVU_nonlinear) gets no legend entry
            continue
        colour, label, alpha = _BAND_STYLE[key]
        ax.fill_between(xs, lo, hi, color=colour, alpha=alpha, linewidth=0, label=label)
    if math.isfinite(nl):
        ax.axhline(
            nl, color=BLUE, linestyle="-.", linewidth=1, label=f"Mean FVU$_\\mathrm{{nonlinear}}$ ≈ {nl:.3f}"
        )


def _draw_extended(
    ax: Axes, grid: _WidthGrid, curve: np.ndarray, colour: str, linewidth: float, linestyle: str, label: str
) -> None:
    """A curve drawn ``linestyle`` over the measured widths and dotted where it extrapolates."""
    ax.plot(
        grid.xs[grid.inside],
        curve[grid.inside],
        color=colour,
        linewidth=linewidth,
        linestyle=linestyle,
        label=label,
    )
    ax.plot(grid.xs[~grid.inside], curve[~grid.inside], color=colour, linewidth=linewidth, linestyle=":")


def _draw_fit(ax: Axes, grid: _WidthGrid, top: np.ndarray, c: float, nl: float, label: str) -> None:
    """The fitted SAE curve, its asymptote c, and a note when c lies below FVU_nonlinear."""
    _draw_extended(ax, grid, top, BLACK, 1.4, "-", label)
    ax.axhline(c, color="#555555", linestyle="--", linewidth=1, label=f"Asymptote c = {c:.3f} (W → ∞)")
    if math.isfinite(nl) and c < nl:
        ax.plot([], [], " ", label="Note: c < FVU$_\\mathrm{nonlinear}$, so no linear-error band is drawn")


def _draw_points(ax: Axes, data: _Measured) -> None:
    """The measured SAE FVU, FVU_nonlinear and (if given) gradient-pursuit FVU, one marker per SAE."""
    ax.plot(data.W, data.y, "o", color=BLACK, markersize=5, label="SAE FVU", zorder=4)
    ax.plot(
        data.W,
        data.ynl,
        "s",
        color=BLUE,
        markersize=4.5,
        label="FVU$_\\mathrm{nonlinear}$ (SAE + linear prediction)",
        zorder=4,
    )
    if data.py is not None:
        ax.plot(data.W, data.py, "^", color=VERMILION, markersize=5, label="Gradient-pursuit FVU", zorder=4)


def _draw_pursuit(
    ax: Axes, grid: _WidthGrid, data: _Measured, pursuit_fit: Mapping[str, float] | None
) -> None:
    """The gradient-pursuit fit (dashed) and pursuit FVU_nonlinear markers, where given."""
    if _fit_ok(pursuit_fit):
        assert pursuit_fit is not None
        _, pcurve = _fit_curve(pursuit_fit, grid.xs)
        _draw_extended(ax, grid, pcurve, VERMILION, 1.1, "--", _fit_label("Pursuit: ", pursuit_fit, None))
    if data.pnl is not None:
        ax.plot(
            data.W,
            data.pnl,
            "v",
            color=PURPLE,
            markersize=4.5,
            markerfacecolor="none",
            zorder=4,
            label="Pursuit FVU$_\\mathrm{nonlinear}$",
        )


def _finish_axes(ax: Axes, grid: _WidthGrid, data: _Measured, nl: float, top: np.ndarray | None) -> None:
    """Log2 width axis over the grid, y from 0 to above the highest value at the smallest width, legend."""
    _log2_axis(ax, "x")
    ax.set_xlim(grid.xs[0], grid.xs[-1])
    tops = [data.y, data.ynl, np.array([nl])]
    if data.py is not None:
        tops.append(data.py)
    if top is not None:
        tops.append(top[:1])
    rng = _finite_range(*tops)
    ax.set_ylim(0, (rng[1] if rng and rng[1] > 0 else 1.0) * 1.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))


@_styled
def plot_scaling_decomposition(
    widths: Sequence[int],
    fvu: Sequence[float],
    fvu_nonlinear: Sequence[float],
    fit: Mapping[str, float] | None,
    fit_ci: Mapping[str, Any] | None,
    nonlinear_mean: float,
    out_dir: Path,
    stem: str = "scaling_decomposition",
    pursuit_fvu: Sequence[float] | None = None,
    pursuit_fit: Mapping[str, float] | None = None,
    pursuit_nonlinear: Sequence[float] | None = None,
    *,
    extend: float = 64.0,
) -> dict[str, Path]:
    """Fig 1: SAE FVU against width W, its power-law fit c + a·W^(−m), and the stacked error decomposition.

    ``widths``/``fvu``/``fvu_nonlinear`` have one entry per SAE (FVU of Sae(x), and of Sae(x) + the
    linear error prediction). ``fit`` is ``{"c", "a", "m"}`` (or None: no curve, one combined band);
    ``fit_ci`` is ``{"c": {"low", "high"}, ...}`` and adds ± half-widths to the legend.
    ``nonlinear_mean`` is the FVU_nonlinear level (NaN: the mean of ``fvu_nonlinear``). The curve is
    extended to ``extend`` × the largest width (dotted beyond the data). Bands, top to bottom: absent
    features (curve − c), linear error (c − FVU_nonlinear), encoder error (FVU_nonlinear − pursuit
    FVU_nonlinear, if ``pursuit_nonlinear`` is given; interpolated over log W, flat beyond the data) and
    nonlinear error. Heights are clipped at zero, so c below FVU_nonlinear leaves no linear-error band.
    """
    data = _measured(widths, fvu, fvu_nonlinear, pursuit_fvu, pursuit_nonlinear)
    fig = _figure(10.0, 4.8)
    ax = fig.subplots()
    _style_axes(
        ax,
        "SAE error vs. width: fitted scaling law and decomposition of the unexplained variance",
        "SAE width W (number of latents, log scale)",
        "FVU (fraction of variance unexplained)",
        "both",
    )
    grid = _width_grid(data.W, extend)
    if grid is None:
        _no_data(ax, "no SAE with a positive width")
        return save(fig, out_dir, stem)
    nl = _nonlinear_level(nonlinear_mean, data.ynl)
    c, top = _fvu_top(grid, data, fit)
    p_level = _interp_logx(grid.xs, data.W, data.pnl) if data.pnl is not None else None
    _draw_bands(ax, grid.xs, top, c, nl, p_level)
    if _fit_ok(fit):
        assert fit is not None and top is not None
        _draw_fit(ax, grid, top, c, nl, _fit_label("", fit, fit_ci))
    _draw_points(ax, data)
    _draw_pursuit(ax, grid, data, pursuit_fit)
    _finish_axes(ax, grid, data, nl, top)
    return save(fig, out_dir, stem)
