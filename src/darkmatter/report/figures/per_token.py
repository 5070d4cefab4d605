"""Figs 4, 5 and App. E: how SAE error norms relate token by token across SAE widths."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from darkmatter.errors import ShapeError
from darkmatter.report.figures.inputs import _arr, _finite_range, _same_len
from darkmatter.report.figures.style import (
    _cmap,
    _figure,
    _no_data,
    _norm,
    _style_axes,
    _styled,
    _text_colour,
    save,
)


def _escape_token(tok: str) -> str:
    """Render a token string literally: no mathtext, visible whitespace and control characters."""
    out = tok.replace("$", r"\$")  # a lone backslash is literal outside mathtext
    out = out.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out)
    if out.strip() == "":
        return "␣" * len(out) if out else "''"
    return out


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
