"""Figs 7-10 and 15 (§5-§6): what the linear and nonlinear error components do downstream.

CE loss recovered by adding each component back, SAEs trained on each component (training curves and
auto-interp detection accuracy), predicting the error from earlier layers, and the synthetic simulation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.ticker import PercentFormatter

from darkmatter.report.figures.inputs import _arr, _finite_range, _same_len
from darkmatter.report.figures.style import (
    BLACK,
    BLUE,
    GREEN,
    MISSING,
    ORANGE,
    PALETTE,
    _figure,
    _log2_axis,
    _no_data,
    _style_axes,
    _styled,
    save,
)


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
