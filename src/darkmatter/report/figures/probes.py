"""Figs 13 and 14: what predicts the SAE error norm, and how the norm probe relates to the SAE's latents."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from darkmatter.report.figures.inputs import _arr, _finite_range, _same_len
from darkmatter.report.figures.style import BLUE, VERMILION, _figure, _no_data, _style_axes, _styled, save


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
