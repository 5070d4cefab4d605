"""House style shared by every figure: palette, rcParams, axes helpers, colour scales and :func:`save`."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import matplotlib as mpl
from cycler import cycler
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from darkmatter import atomic

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

# Fixed metadata keeps the files byte-identical for identical inputs.
_METADATA: dict[str, dict[str, Any]] = {
    "png": {"Software": None},
    "pdf": {"CreationDate": None, "Producer": None},
}

F = TypeVar("F", bound=Callable[..., dict[str, Path]])


def _styled(fn: F) -> F:
    """Draw and save under the house rcParams (restored afterwards, so callers' settings are untouched)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Path]:
        with mpl.rc_context(cast(Any, _RC)):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


FORMATS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("FORMATS", default=("png", "pdf"))
"""The file formats ``save`` writes; ``formats(...)`` changes them for a block."""
PNG_DPI: contextvars.ContextVar[int] = contextvars.ContextVar("PNG_DPI", default=DPI)
"""The resolution of PNG files (the PDF is vector graphics); ``formats(..., dpi=...)`` changes it."""


@contextlib.contextmanager
def formats(kinds: tuple[str, ...], *, dpi: int = DPI) -> Iterator[None]:
    """Write only ``kinds`` (a subset of png, pdf), PNGs at ``dpi``, in this block."""
    unknown = set(kinds) - {"png", "pdf"}
    if unknown or not kinds or dpi < 10:
        raise ValueError(
            f"figure formats must be a non-empty subset of png, pdf and dpi >= 10; got {kinds}, {dpi}"
        )
    tokens = FORMATS.set(tuple(kinds)), PNG_DPI.set(dpi)
    try:
        yield
    finally:
        FORMATS.reset(tokens[0])
        PNG_DPI.reset(tokens[1])


def save(fig: Figure, out_dir: Path, stem: str) -> dict[str, Path]:
    """Write ``fig`` as ``out_dir/stem.png`` (150 dpi) and ``out_dir/stem.pdf`` (see ``formats``), each whole
    or not at all.

    Each file goes through :func:`darkmatter.atomic.target` (temporary file, fsync, rename), so a reader
    never sees a half-written figure, a failure leaves no temporary file and the previous file intact, and
    an ``OSError`` becomes a :class:`~darkmatter.errors.WriteError` naming the file.
    """
    if not stem or Path(stem).name != stem or stem.startswith("."):
        raise ValueError(f"stem must be a plain file name without directories or a leading dot, got {stem!r}")
    paths: dict[str, Path] = {}
    for ext in FORMATS.get():
        final = Path(out_dir) / f"{stem}.{ext}"
        with atomic.target(final) as tmp, warnings.catch_warnings():
            # Token strings may hold characters (CJK, emoji) that the default font lacks; a box is fine.
            warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font")
            fig.savefig(tmp, format=ext, dpi=PNG_DPI.get(), metadata=_METADATA[ext])
        paths[ext] = final
    return paths


def _figure(width: float, height: float) -> Figure:
    """A fresh pyplot-free figure (``width`` × ``height`` inches) with constrained layout."""
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
    """Say in grey, mid-axes, that there was nothing to draw."""
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


def _norm(lo_hi: tuple[float, float] | None) -> Normalize:
    """Colour normalisation over ``lo_hi`` (0..1 when None), padded when the range is degenerate."""
    lo, hi = lo_hi if lo_hi is not None else (0.0, 1.0)
    if hi - lo < 1e-12:  # a constant field still needs a non-degenerate colour scale
        pad = max(abs(lo) * 0.05, 1e-3)
        lo, hi = lo - pad, hi + pad
    return Normalize(vmin=lo, vmax=hi)


def _cmap(name: str = SEQ_CMAP) -> Colormap:
    """The sequential colour map, with NaN cells drawn near-white."""
    return colormaps[name].with_extremes(bad="#F2F2F2")


def _text_colour(cmap: Colormap, norm: Normalize, v: float) -> str:
    """White or black, whichever reads better on the colour ``v`` maps to."""
    r, g, b, _ = cmap(norm(v))
    return "white" if 0.299 * r + 0.587 * g + 0.114 * b < 0.5 else "black"
