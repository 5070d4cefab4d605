"""The paper's figures as pure plotting functions: plain data in, a PNG (150 dpi) and a PDF out.

Every ``plot_*`` function takes lists / numpy arrays, draws on a fresh ``matplotlib.figure.Figure``
(no pyplot, no global backend), and writes ``OUT_DIR/STEM.png`` and ``OUT_DIR/STEM.pdf`` atomically
through :func:`save`, returning ``{"png": path, "pdf": path}``. NaN (or ``None``) entries are skipped or
drawn grey; they never raise. Mismatched lengths raise :class:`~darkmatter.errors.ShapeError`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import matplotlib as mpl
import numpy as np
from cycler import cycler
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator, PercentFormatter

from darkmatter.errors import ShapeError

__all__ = [
    "PALETTE",
    "plot_ce_recovered",
    "plot_detection_accuracy",
    "plot_earlier_layer_r2",
    "plot_error_prediction_maps",
    "plot_layer_baselines",
    "plot_linear_vs_nonlinear_norms",
    "plot_norm_prediction_violins",
    "plot_per_token_matrix",
    "plot_probe_vs_latents",
    "plot_scaling_decomposition",
    "plot_synthetic_simulation",
    "plot_token_trace",
    "plot_training_curves",
    "save",
]

# Okabe & Ito (2008) colour-blind-safe palette, ordered so that the first two series contrast most.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#E69F00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
BLUE, VERMILION, GREEN, ORANGE, PURPLE, SKY, YELLOW, BLACK = PALETTE
MISSING = "#B0B0B0"  # NaN points, cells and bars
SEQ_CMAP = "viridis"
DPI = 150

_RC: dict[str, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.prop_cycle": cycler(color=PALETTE),
    "grid.alpha": 0.35,
    "grid.linewidth": 0.5,
    "pdf.fonttype": 42,  # TrueType in the PDF: text stays selectable and editable
    "image.cmap": SEQ_CMAP,
}

F = TypeVar("F", bound=Callable[..., dict[str, Path]])


def _styled(fn: F) -> F:
    """Draw and save under the house rcParams (restored afterwards, so callers' settings are untouched)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Path]:
        with mpl.rc_context(cast(Any, _RC)):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def save(fig: Figure, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``fig`` as ``out_dir/stem.png`` (150 dpi) and ``out_dir/stem.pdf``, each whole or not at all.

    Each file is rendered to a temporary name in ``out_dir`` and renamed over the target (``os.replace``
    via ``Path.replace``), so a reader never sees a half-written figure and a failure leaves no temp file.
    """
    if not stem or Path(stem).name != stem or stem.startswith("."):
        raise ValueError(f"stem must be a plain file name without directories or a leading dot, got {stem!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    # Fixed metadata keeps the files byte-identical for identical inputs.
    meta = {"png": {"Software": None}, "pdf": {"CreationDate": None, "Producer": None}}
    for ext in ("png", "pdf"):
        final = out_dir / f"{stem}.{ext}"
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=f".{ext}.tmp", dir=out_dir)
        os.close(fd)
        try:
            with warnings.catch_warnings():
                # Token strings may hold characters (CJK, emoji) that the default font lacks; a box is fine.
                warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
                fig.savefig(tmp, format=ext, dpi=DPI, metadata=meta[ext])
            Path(tmp).replace(final)
        except BaseException:
            with contextlib.suppress(OSError):
                Path(tmp).unlink()
            raise
        paths[ext] = final
    return paths


# ---------------------------------------------------------------------------------------------- helpers


def _arr(values: Any, name: str) -> np.ndarray:
    """1-D float array; ``None`` becomes NaN."""
    a = np.asarray(values if values is not None else [], dtype=float)
    if a.ndim != 1:
        raise ShapeError(f"{name} must be a flat list of numbers, got an array of shape {a.shape}.")
    return a


Sized = Sequence[Any] | np.ndarray


def _same_len(ref: str, n: int, **arrays: Sized) -> None:
    for name, a in arrays.items():
        if len(a) != n:
            raise ShapeError(
                f"{name} has {len(a)} entries but {ref} has {n}; pass exactly one value per entry of {ref}."
            )


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _style_axes(
    ax: Axes, title: str | None = None, xlabel: str | None = None, ylabel: str | None = None, grid: str = "y"
) -> None:
    """House axes style: title, unit-bearing labels, light grid on ``grid`` ("x", "y", "both" or "")."""
    if title:
        ax.set_title(title)
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if grid:
        ax.grid(True, axis=grid)  # type: ignore[arg-type]
        ax.set_axisbelow(True)
    ax.tick_params(length=3, width=0.6)


def _no_data(ax: Axes, what: str = "no finite values") -> None:
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color=MISSING)


def _fmt_width(w: float) -> str:
    """Latent counts as the paper writes them: 16k, 131k, 1M (small counts in full)."""
    if not math.isfinite(w) or w <= 0:
        return ""
    if w < 10_000:
        return f"{w:.0f}" if abs(w - round(w)) < 1e-6 else f"{w:.3g}"
    if w < 1e6:
        return f"{int(w // 1000)}k"
    return f"{w / 1e6:.2g}M"


def _log2_axis(ax: Axes, axis: str = "x", fmt: Callable[[float], str] = _fmt_width) -> None:
    """Log base-2 axis with plain tick labels (default: latent counts as 16k / 1M) and no minor ticks."""
    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    a.set_major_locator(LogLocator(base=2, numticks=9))
    a.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    a.set_minor_locator(NullLocator())


def _finite_range(*arrays: np.ndarray) -> tuple[float, float] | None:
    vals = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.array([])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return None
    return float(vals.min()), float(vals.max())


def _norm(lo_hi: tuple[float, float] | None) -> Normalize:
    lo, hi = lo_hi if lo_hi is not None else (0.0, 1.0)
    if hi - lo < 1e-12:  # a constant field still needs a non-degenerate colour scale
        pad = max(abs(lo) * 0.05, 1e-3)
        lo, hi = lo - pad, hi + pad
    return Normalize(vmin=lo, vmax=hi)


def _cmap(name: str = SEQ_CMAP) -> Colormap:
    return colormaps[name].with_extremes(bad="#F2F2F2")


def _text_colour(cmap: Colormap, norm: Normalize, v: float) -> str:
    r, g, b, _ = cmap(norm(v))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"


def _escape_token(tok: str) -> str:
    """Render a token string literally: no mathtext, visible whitespace and control characters."""
    out = tok.replace("$", r"\$")  # a lone backslash is literal outside mathtext
    out = out.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out)
    if out.strip() == "":
        return "␣" * len(out) if out else "''"
    return out


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


# ----------------------------------------------------------------------------------------- §4 figures


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
    ok = np.isfinite(w) & np.isfinite(l0) & (w > 0) & (l0 > 0)
    w, l0 = w[ok], l0[ok]
    uw, ul = np.unique(w), np.unique(l0)
    pairs = {(a, b): i for i, (a, b) in enumerate(zip(w, l0, strict=True))}
    full_grid = len(uw) >= 2 and len(ul) >= 2 and len(pairs) == len(w) == len(uw) * len(ul)

    fig = _figure(13.5, 4.3)
    axes = fig.subplots(1, 3)
    small = len(w) <= 24
    for ax, (title, values, cbar_label) in zip(axes, panels, strict=True):
        v = values[ok]
        cmap, norm = _cmap(), _norm(_finite_range(v))
        fin = np.isfinite(v)
        if full_grid and fin.sum() >= 3:
            Z = np.full((len(ul), len(uw)), np.nan)
            for (a, b), i in pairs.items():
                Z[np.searchsorted(ul, b), np.searchsorted(uw, a)] = v[i]
            levels = np.linspace(cast(float, norm.vmin), cast(float, norm.vmax), 13)
            ax.contourf(uw, ul, np.ma.masked_invalid(Z), levels=levels, cmap=cmap, norm=norm, alpha=0.85)
        ax.scatter(
            w[fin],
            l0[fin],
            c=v[fin],
            cmap=cmap,
            norm=norm,
            s=70 if small else 28,
            edgecolors="black",
            linewidths=0.6,
            zorder=3,
        )
        ax.scatter(
            w[~fin],
            l0[~fin],
            s=70 if small else 28,
            facecolors="none",
            edgecolors=MISSING,
            linewidths=1.2,
            zorder=3,
            label="NaN" if (~fin).any() else None,
        )
        for a, b, val in zip(w, l0, v, strict=True):
            ax.annotate(
                "NaN" if not math.isfinite(val) else f"{val:.3f}",
                (a, b),
                xytext=(5, 4),
                textcoords="offset points",
                fontsize=7 if small else 5.5,
                zorder=4,
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
            )
        fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=cbar_label, shrink=0.9)
        _style_axes(ax, title, "SAE width (number of latents)", "L0 (mean active latents per token)", "both")
        _log2_axis(ax, "x")
        _log2_axis(ax, "y", lambda v: f"{v:.3g}")
        if len(w):
            ax.set_xlim(uw.min() / 1.6, uw.max() * 1.6)
            ax.set_ylim(ul.min() / 1.4, ul.max() * 1.4)
            # label the measured L0s themselves unless neighbours would overlap (empirical L0s cluster)
            if len(ul) <= 10 and (len(ul) < 2 or np.diff(np.log(ul)).min() > np.log(1.25)):
                ax.set_yticks(ul, [f"{x:.3g}" for x in ul])
                ax.yaxis.set_minor_locator(NullLocator())
        else:
            _no_data(ax, "no SAE with a positive width and L0")
        if (~fin).any():
            ax.legend(loc="lower left")
    fig.suptitle("How much of the SAE error is linearly predictable from the input, per SAE (width × L0)")
    return save(fig, out_dir, stem)


def _fit_label(prefix: str, fit: Mapping[str, float], ci: Mapping[str, Any] | None) -> str:
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
    try:
        return fit is not None and all(math.isfinite(float(fit[k])) for k in ("c", "a", "m"))
    except (KeyError, TypeError, ValueError):
        return False


def _interp_logx(x: np.ndarray, xp: np.ndarray, fp: np.ndarray) -> np.ndarray | None:
    """Piecewise-linear in log(x) through the finite points; flat beyond the ends; None if none."""
    ok = np.isfinite(xp) & np.isfinite(fp) & (xp > 0)
    if not ok.any():
        return None
    order = np.argsort(xp[ok])
    return np.interp(np.log(x), np.log(xp[ok][order]), fp[ok][order])


_BAND_STYLE = {
    "absent": (SKY, "Absent features (not yet learned; fit − c)", 0.35),
    "linear": (ORANGE, "Linear error (dense / not learned linearly; c − FVU$_\\mathrm{nonlinear}$)", 0.35),
    "linear+absent": (ORANGE, "Linear error + absent features (no fit)", 0.35),
    "encoder": (PURPLE, "Encoder error (SAE − pursuit FVU$_\\mathrm{nonlinear}$)", 0.6),
    "nonlinear": (GREEN, "Nonlinear error", 0.3),
}


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
    W, y, ynl = _arr(widths, "widths"), _arr(fvu, "fvu"), _arr(fvu_nonlinear, "fvu_nonlinear")
    _same_len("widths", len(W), fvu=y, fvu_nonlinear=ynl)
    py = _arr(pursuit_fvu, "pursuit_fvu") if pursuit_fvu is not None else None
    pnl = _arr(pursuit_nonlinear, "pursuit_nonlinear") if pursuit_nonlinear is not None else None
    _same_len(
        "widths",
        len(W),
        **{k: v for k, v in (("pursuit_fvu", py), ("pursuit_nonlinear", pnl)) if v is not None},
    )

    fig = _figure(10.0, 4.8)
    ax = fig.subplots()
    _style_axes(
        ax,
        "SAE error vs. width: fitted scaling law and decomposition of the unexplained variance",
        "SAE width W (number of latents, log scale)",
        "FVU (fraction of variance unexplained)",
        "both",
    )
    goodW = W[np.isfinite(W) & (W > 0)]
    if goodW.size == 0:
        _no_data(ax, "no SAE with a positive width")
        return save(fig, out_dir, stem)
    w_lo, w_hi = goodW.min(), goodW.max()
    xs = np.geomspace(w_lo / 1.3, w_hi * max(extend, 1.0), 400)
    inside = xs <= w_hi * (1 + 1e-9)

    nl = float(nonlinear_mean) if nonlinear_mean is not None else math.nan
    if not math.isfinite(nl) and np.isfinite(ynl).any():
        nl = float(np.nanmean(ynl))
    has_fit = _fit_ok(fit)
    top: np.ndarray | None
    if has_fit:
        assert fit is not None
        c, a, m = (float(fit[k]) for k in ("c", "a", "m"))
        top = c + a * xs ** (-m)
    else:
        c = math.nan
        top = _interp_logx(xs, W, y)
        if top is not None:  # without a fit, only the measured range is known
            top = np.where((xs >= w_lo) & inside, top, np.nan)
    p_level = _interp_logx(xs, W, pnl) if pnl is not None else None

    for key, lo, hi in decomposition_bands(xs.shape, top, c, nl, p_level):
        if not np.nan_to_num(hi - lo).any():  # an empty band (e.g. c < FVU_nonlinear) gets no legend entry
            continue
        colour, label, alpha = _BAND_STYLE[key]
        ax.fill_between(xs, lo, hi, color=colour, alpha=alpha, linewidth=0, label=label)
    if math.isfinite(nl):
        ax.axhline(
            nl, color=BLUE, linestyle="-.", linewidth=1, label=f"Mean FVU$_\\mathrm{{nonlinear}}$ ≈ {nl:.3f}"
        )

    if has_fit:
        assert top is not None
        ax.plot(xs[inside], top[inside], color=BLACK, linewidth=1.4, label=_fit_label("", fit, fit_ci))  # type: ignore[arg-type]
        ax.plot(xs[~inside], top[~inside], color=BLACK, linewidth=1.4, linestyle=":")
        ax.axhline(c, color="#555555", linestyle="--", linewidth=1, label=f"Asymptote c = {c:.3f} (W → ∞)")
        if math.isfinite(nl) and c < nl:
            ax.plot(
                [], [], " ", label="Note: c < FVU$_\\mathrm{nonlinear}$, so no linear-error band is drawn"
            )
    ax.plot(W, y, "o", color=BLACK, markersize=5, label="SAE FVU", zorder=4)
    ax.plot(
        W,
        ynl,
        "s",
        color=BLUE,
        markersize=4.5,
        label="FVU$_\\mathrm{nonlinear}$ (SAE + linear prediction)",
        zorder=4,
    )
    if py is not None:
        ax.plot(W, py, "^", color=VERMILION, markersize=5, label="Gradient-pursuit FVU", zorder=4)
    if _fit_ok(pursuit_fit):
        assert pursuit_fit is not None
        pc, pa, pm = (float(pursuit_fit[k]) for k in ("c", "a", "m"))
        pcurve = pc + pa * xs ** (-pm)
        ax.plot(
            xs[inside],
            pcurve[inside],
            color=VERMILION,
            linewidth=1.1,
            linestyle="--",
            label=_fit_label("Pursuit: ", pursuit_fit, None),
        )
        ax.plot(xs[~inside], pcurve[~inside], color=VERMILION, linewidth=1.1, linestyle=":")
    if pnl is not None:
        ax.plot(
            W,
            pnl,
            "v",
            color=PURPLE,
            markersize=4.5,
            markerfacecolor="none",
            zorder=4,
            label="Pursuit FVU$_\\mathrm{nonlinear}$",
        )

    _log2_axis(ax, "x")
    ax.set_xlim(xs[0], xs[-1])
    tops = [y, ynl, np.array([nl])]
    if py is not None:
        tops.append(py)
    if top is not None:
        tops.append(top[:1])
    rng = _finite_range(*tops)
    ax.set_ylim(0, (rng[1] if rng and rng[1] > 0 else 1.0) * 1.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(fig, out_dir, stem)


@_styled
def plot_per_token_matrix(
    names: Sequence[str],
    r2: np.ndarray,
    out_dir: Path,
    stem: str = "per_token_r2",
    title: str = "Per-token predictability of the larger SAE's error norm from the smaller SAE's",
    cmap_label: str = "R²",
    *,
    fmt: str = ".2f",
    xlabel: str = "Target SAE (error norm predicted)",
    ylabel: str = "Predictor SAE (error norm used)",
) -> dict[str, Path]:
    """Fig 4 / App. E: annotated heat map, ``r2[i, j]`` = score of predicting SAE j from SAE i.

    ``r2`` is ``[n, n]`` for the ``n`` ``names``; NaN cells (e.g. on and below the diagonal) are left
    blank. Reuse with ``cmap_label="% reduction of unexplained variance"`` and ``fmt=".1f"`` for App. E.
    """
    M = np.asarray(r2, dtype=float)
    n = len(names)
    if M.shape != (n, n):
        raise ShapeError(f"r2 must be [{n}, {n}] for {n} names, got shape {M.shape}.")
    side = min(max(4.5, 0.75 * n + 2.5), 14.0)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    cmap, norm = _cmap(), _norm(_finite_range(M))
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, norm=norm, aspect="equal")
    fs = 8 if n <= 8 else max(4.5, 8 - 0.3 * (n - 8))
    for i in range(n):
        for j in range(n):
            if math.isfinite(M[i, j]):
                ax.text(
                    j,
                    i,
                    format(M[i, j], fmt),
                    ha="center",
                    va="center",
                    fontsize=fs,
                    color=_text_colour(cmap, norm, M[i, j]),
                )
    ax.set_xticks(range(n), list(names), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), list(names))
    ax.spines[:].set_visible(False)
    _style_axes(ax, title, xlabel, ylabel, grid="")
    fig.colorbar(im, ax=ax, label=cmap_label, shrink=0.85)
    if not np.isfinite(M).any():
        _no_data(ax)
    return save(fig, out_dir, stem)


@_styled
def plot_token_trace(
    tokens: Sequence[str],
    series: Mapping[str, Sequence[float]],
    out_dir: Path,
    stem: str = "token_trace",
    *,
    ylabel: str = "‖SaeError‖ per token (L2 norm, activation units)",
) -> dict[str, Path]:
    """Fig 5: per-token SAE error norms of several SAEs over consecutive tokens.

    ``series`` maps an SAE name to one value per entry of ``tokens``; NaN values break the line. Token
    strings become the x tick labels, shown literally (``$``, newlines and tabs escaped).
    """
    T = len(tokens)
    data = {k: _arr(v, f"series[{k!r}]") for k, v in series.items()}
    _same_len("tokens", T, **{f"series[{k!r}]": v for k, v in data.items()})
    fig = _figure(min(max(8.0, 0.13 * T + 2.5), 24.0), 4.2)
    ax = fig.subplots()
    x = np.arange(T)
    for k, v in data.items():
        ax.plot(x, v, marker="o", markersize=2.2, linewidth=1.1, label=k)
    step = max(1, math.ceil(T / 180))
    ax.set_xticks(x[::step], [_escape_token(str(t)) for t in tokens][::step], rotation=90, fontsize=6)
    ax.set_xlim(-0.8, T - 0.2)
    _style_axes(ax, f"Per-token SAE error norms over {T} consecutive tokens", "Token", ylabel)
    if data:
        ax.legend(title="SAE", loc="upper left", bbox_to_anchor=(1.005, 1.0))
    if not any(np.isfinite(v).any() for v in data.values()):
        _no_data(ax)
    return save(fig, out_dir, stem)


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


@_styled
def plot_layer_baselines(
    layers: Sequence[int],
    r2_by_predictor: Mapping[str, Sequence[float]],
    out_dir: Path,
    stem: str = "layer_baselines",
) -> dict[str, Path]:
    """Fig 13: R² of predicting the squared SAE error norm from each predictor, across layers.

    ``r2_by_predictor`` maps a predictor name (activations, token identity, L0, activation norm, model
    loss, ...) to one R² per entry of ``layers``; NaN leaves a gap. y spans min(0, data) to 1.
    """
    L = _arr(layers, "layers")
    data = {k: _arr(v, f"r2_by_predictor[{k!r}]") for k, v in r2_by_predictor.items()}
    _same_len("layers", len(L), **{f"r2_by_predictor[{k!r}]": v for k, v in data.items()})
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    markers = "osD^v<>P"
    for i, (k, v) in enumerate(data.items()):
        ax.plot(L, v, marker=markers[i % len(markers)], markersize=4, linewidth=1.2, label=k)
    rng = _finite_range(*data.values())
    lo = min(0.0, rng[0]) if rng else 0.0
    ax.set_ylim(lo - 0.02 * (1 - lo), 1.02)
    _style_axes(
        ax,
        "Predicting the squared SAE error norm ‖SaeError‖²: R² by predictor and layer",
        "Layer",
        "Test R²",
        "both",
    )
    if data:
        ax.legend(title="Predictor", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if rng is None:
        _no_data(ax)
    return save(fig, out_dir, stem)


@_styled
def plot_probe_vs_latents(
    probe_dot: Sequence[float],
    mean_active: Sequence[float],
    out_dir: Path,
    stem: str = "probe_vs_latents",
    corr: float | None = None,
) -> dict[str, Path]:
    """Fig 14: per latent, the norm probe dotted with its decoder row against its mean activation when active.

    One entry per latent in both lists (never-active latents as NaN are dropped). ``corr`` goes in the
    title; if None, the Pearson correlation of the finite pairs is used. Points are rasterised in the PDF.
    """
    y, x = _arr(probe_dot, "probe_dot"), _arr(mean_active, "mean_active")
    _same_len("probe_dot", len(y), mean_active=x)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if corr is None and x.size >= 2 and np.ptp(x) > 0 and np.ptp(y) > 0:
        corr = float(np.corrcoef(x, y)[0, 1])
    fig = _figure(5.8, 4.8)
    ax = fig.subplots()
    alpha = 0.8 if x.size < 500 else max(0.08, min(0.5, 200 / x.size**0.75))
    ax.scatter(
        x,
        y,
        s=10 if x.size < 500 else 3,
        color=BLUE,
        alpha=alpha,
        linewidths=0,
        rasterized=True,
        label=f"Latents (n={x.size})",
    )
    rng = _finite_range(x, y)
    if rng:
        lo, hi = rng
        pad = 0.03 * (hi - lo or 1.0)
        ax.plot(
            [lo - pad, hi + pad],
            [lo - pad, hi + pad],
            color=VERMILION,
            linestyle="--",
            linewidth=1.2,
            label="y = x",
        )
    else:
        _no_data(ax)
    corr_txt = f"Pearson r = {corr:.3f}" if corr is not None and math.isfinite(corr) else "correlation n/a"
    _style_axes(
        ax,
        f"Norm probe along each decoder row vs. the latent's typical activation ({corr_txt})",
        "Mean activation when active",
        "Probe · decoder row",
        "both",
    )
    ax.title.set_wrap(True)
    ax.legend(loc="upper left", markerscale=2)
    return save(fig, out_dir, stem)


# ----------------------------------------------------------------------------------------- §5-§6 figures


@_styled
def plot_ce_recovered(
    settings: Sequence[str],
    ce_linear: Sequence[float],
    ce_nonlinear: Sequence[float],
    r2_linear: Sequence[float],
    r2_nonlinear: Sequence[float],
    norm_linear: Sequence[float],
    norm_nonlinear: Sequence[float],
    out_dir: Path,
    stem: str = "downstream_ce",
) -> dict[str, Path]:
    """Figs 8/9: % of the CE-loss increase recovered by adding back each error component, per SAE setting.

    All lists are percentages, one per setting. Bars are the CE % recovered; over each bar a dashed tick
    marks the component's R² % recovered and a dotted tick its share of the error norm, the two
    "proportional" references. NaN bars are drawn as grey "n/a".
    """
    vals = {
        k: _arr(v, k)
        for k, v in (
            ("ce_linear", ce_linear),
            ("ce_nonlinear", ce_nonlinear),
            ("r2_linear", r2_linear),
            ("r2_nonlinear", r2_nonlinear),
            ("norm_linear", norm_linear),
            ("norm_nonlinear", norm_nonlinear),
        )
    }
    n = len(settings)
    _same_len("settings", n, **vals)
    fig = _figure(max(6.0, 0.8 * n + 3.0), 4.2)
    ax = fig.subplots()
    x = np.arange(n, dtype=float)
    bw = 0.38
    for off, comp, colour, name in (
        (-bw / 2, "linear", ORANGE, "Linear"),
        (bw / 2, "nonlinear", GREEN, "Nonlinear"),
    ):
        ce, r2v, nv = vals[f"ce_{comp}"], vals[f"r2_{comp}"], vals[f"norm_{comp}"]
        fin = np.isfinite(ce)
        ax.bar(x[fin] + off, ce[fin], bw, color=colour, alpha=0.8, label=f"Reconstruction + {name} error: CE")
        for xi in x[~fin]:
            ax.text(xi + off, 1, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color=MISSING)
        ax.hlines(r2v, x + off - bw / 2, x + off + bw / 2, color=BLACK, linestyles="--", linewidth=1.2)
        ax.hlines(nv, x + off - bw / 2, x + off + bw / 2, color=BLUE, linestyles=":", linewidth=1.6)
    ax.plot([], [], "--", color=BLACK, label="R² % recovered (reference)")
    ax.plot([], [], ":", color=BLUE, linewidth=1.6, label="Share of error norm, % (reference)")
    ax.set_xticks(x, list(settings), rotation=30 if n > 6 else 0, ha="right" if n > 6 else "center")
    rng = _finite_range(*vals.values())
    ax.set_ylim(min(0.0, rng[0] * 1.1) if rng else 0.0, max(100.0, rng[1] * 1.08) if rng else 100.0)
    _style_axes(
        ax,
        "Downstream CE loss recovered by adding back each SAE error component",
        "SAE setting",
        "CE loss increase recovered (%)",
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save(fig, out_dir, stem)


@_styled
def plot_training_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    out_dir: Path,
    stem: str = "training_curves",
) -> dict[str, Path]:
    """FVU against training step, one line per run (e.g. SAEs trained on LinearError vs NonlinearError).

    ``curves[name]`` is a list of ``(step, fvu)`` pairs; NaN FVUs break the line. The y axis turns
    logarithmic when the positive FVUs span more than a factor of 10.
    """
    fig = _figure(7.0, 4.2)
    ax = fig.subplots()
    all_y = []
    for name, pts in curves.items():
        a = np.asarray(list(pts), dtype=float).reshape(-1, 2) if len(pts) else np.empty((0, 2))
        order = np.argsort(a[:, 0], kind="stable")
        ax.plot(a[order, 0], a[order, 1], linewidth=1.3, label=f"{name} (final {_last_finite(a[order, 1])})")
        all_y.append(a[:, 1])
    rng = _finite_range(*all_y)
    pos = np.concatenate(all_y)[np.concatenate(all_y) > 0] if all_y else np.array([])
    if pos.size and pos.max() / pos.min() > 10:
        _log2_axis(ax, "y", lambda v: f"{v:.3g}")
    _style_axes(ax, "Training curves: FVU against training step", "Training step", "FVU (fraction)", "both")
    if curves:
        ax.legend(loc="upper right")
    if rng is None:
        _no_data(ax)
    return save(fig, out_dir, stem)


def _last_finite(y: np.ndarray) -> str:
    f = y[np.isfinite(y)]
    return f"{f[-1]:.3f}" if f.size else "n/a"


@_styled
def plot_detection_accuracy(
    deciles: Sequence[str],
    acc_linear: Sequence[float],
    acc_nonlinear: Sequence[float],
    ci_linear: Sequence[tuple[float, float]],
    ci_nonlinear: Sequence[tuple[float, float]],
    out_dir: Path,
    stem: str = "detection",
) -> dict[str, Path]:
    """Fig 7: auto-interp detection accuracy per activation decile for SAEs trained on each error part.

    One accuracy and one ``(low, high)`` 95% interval per decile label ("Not" = negatives, Q1 = lowest
    activation decile ... Q10 = highest). NaN accuracies or bounds are skipped.
    """
    n = len(deciles)
    a_lin, a_non = _arr(acc_linear, "acc_linear"), _arr(acc_nonlinear, "acc_nonlinear")
    c_lin = np.asarray(list(ci_linear), dtype=float).reshape(-1, 2) if n else np.empty((0, 2))
    c_non = np.asarray(list(ci_nonlinear), dtype=float).reshape(-1, 2) if n else np.empty((0, 2))
    _same_len("deciles", n, acc_linear=a_lin, acc_nonlinear=a_non, ci_linear=c_lin, ci_nonlinear=c_non)
    fig = _figure(max(6.5, 0.55 * n + 2.5), 4.2)
    ax = fig.subplots()
    x = np.arange(n, dtype=float)
    for off, acc, ci, colour, label, mk in (
        (-0.08, a_non, c_non, GREEN, "SAE trained on NonlinearError", "s"),
        (0.08, a_lin, c_lin, ORANGE, "SAE trained on LinearError", "o"),
    ):
        ax.plot(x + off, acc, marker=mk, color=colour, linewidth=1.2, markersize=5, label=label)
        err = np.vstack([acc - ci[:, 0], ci[:, 1] - acc])
        ok = np.isfinite(acc) & np.isfinite(err).all(axis=0)
        ax.errorbar(
            x[ok] + off,
            acc[ok],
            yerr=np.clip(err[:, ok], 0, None),
            fmt="none",
            ecolor=colour,
            elinewidth=1,
            capsize=2.5,
        )
    ax.set_xticks(x, list(deciles))
    rng = _finite_range(a_lin, a_non, c_lin, c_non)
    if rng:
        ax.set_ylim(max(0.0, rng[0] - 0.05), min(1.0, rng[1] + 0.05) if rng[1] <= 1 else rng[1] + 0.05)
    else:
        _no_data(ax)
    _style_axes(
        ax,
        "Auto-interpretability: detection accuracy by activation decile (95% CI)",
        "Activation decile (Not = non-activating examples)",
        "Detection accuracy (fraction correct)",
    )
    ax.legend(loc="upper left")
    return save(fig, out_dir, stem)


@_styled
def plot_earlier_layer_r2(
    regressors: Sequence[str],
    r2: Mapping[str, Sequence[float]],
    out_dir: Path,
    stem: str = "earlier_layers",
) -> dict[str, Path]:
    """Fig 10b: R² of predicting each error target from each component's SAE reconstruction.

    ``r2[target]`` has one R² per entry of ``regressors`` (e.g. residual, previous residual, MLP,
    attention). Groups are targets, bars within a group are regressors, values printed on the bars.
    """
    data = {k: _arr(v, f"r2[{k!r}]") for k, v in r2.items()}
    _same_len("regressors", len(regressors), **{f"r2[{k!r}]": v for k, v in data.items()})
    nt, nr = len(data), len(regressors)
    fig = _figure(max(6.0, 1.1 * nt * max(nr, 1) * 0.45 + 3.0), 4.2)
    ax = fig.subplots()
    x = np.arange(nt, dtype=float)
    bw = 0.8 / max(nr, 1)
    vals = np.array([data[t] for t in data]).reshape(nt, nr) if nt else np.empty((0, nr))
    for j, reg in enumerate(regressors):
        xs = x - 0.4 + bw * (j + 0.5)
        v = vals[:, j]
        fin = np.isfinite(v)
        bars = ax.bar(xs[fin], v[fin], bw * 0.92, color=PALETTE[j % len(PALETTE)], label=f"{reg} SAE output")
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1.5)
        for xi in xs[~fin]:
            ax.text(xi, 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color=MISSING)
    ax.axhline(0, color=BLACK, linewidth=0.6)
    ax.set_xticks(x, [f"Predicting {t}" for t in data])
    rng = _finite_range(vals)
    ax.set_ylim(min(0.0, rng[0] * 1.15) if rng else 0.0, max(0.1, rng[1] * 1.15) if rng else 1.0)
    _style_axes(
        ax,
        "Predicting the SAE error from other components' SAE reconstructions (linear maps)",
        "Target",
        "Test R²",
    )
    ax.legend(title="Regressor", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if rng is None:
        _no_data(ax)
    return save(fig, out_dir, stem)


@_styled
def plot_synthetic_simulation(
    ablation: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    out_dir: Path,
    stem: str = "synthetic",
) -> dict[str, Path]:
    """Fig 15: FVU against the fraction of SAE latents ablated (x reversed, 50% → 0%), one line per setting.

    ``ablation`` holds fractions in [0, 1]; ``curves[name]`` one FVU per ablation level (e.g.
    "σ_act=1, σ_rec=0.6: SAE" and "...: SAE + error prediction"). Names containing "prediction" or
    "linear" are drawn dashed so each setting's pair reads as solid/dashed.
    """
    A = _arr(ablation, "ablation")
    data = {k: _arr(v, f"curves[{k!r}]") for k, v in curves.items()}
    _same_len("ablation", len(A), **{f"curves[{k!r}]": v for k, v in data.items()})
    fig = _figure(7.5, 4.4)
    ax = fig.subplots()
    order = np.argsort(A)
    colour_of: dict[str, str] = {}
    for k, v in data.items():
        dashed = "prediction" in k.lower() or "linear" in k.lower()
        group = k.split(":")[0]
        colour = colour_of.setdefault(group, PALETTE[len(colour_of) % len(PALETTE)])
        ax.plot(
            A[order],
            v[order],
            marker="o",
            markersize=4,
            linewidth=1.3,
            linestyle="--" if dashed else "-",
            color=colour,
            label=k,
        )
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    if np.isfinite(A).any():
        ax.set_xlim(np.nanmax(A) + 0.02, np.nanmin(A) - 0.02)
    rng = _finite_range(*data.values())
    ax.set_ylim(0, (rng[1] * 1.12 if rng and rng[1] > 0 else 1.0))
    _style_axes(
        ax,
        "Synthetic SAE: FVU as latents are ablated, per noise setting",
        "Latents ablated (% of SAE latents, lowest-activation first)",
        "FVU (fraction)",
        "both",
    )
    if data:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if rng is None:
        _no_data(ax)
    return save(fig, out_dir, stem)
