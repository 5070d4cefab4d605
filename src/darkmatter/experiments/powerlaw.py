"""Fig 1 power law FVU(W) = c + a·W^(−m): deterministic constrained least squares and a context bootstrap.

Replaces the paper's Adam fit from a random init (paper-experiments §15 item 19). The solver works in
centred log-width u = log W − mean(log W), where the model reads c + A·exp(−m·u) with A = a·W̄^(−m) (W̄ the
geometric mean width), on data divided by max|FVU|, so every parameter is O(1). c ≥ 0 is a bound; A and m
are fitted as logs, so a > 0 and m > 0 hold by construction.

Uncertainty comes from resampling contexts with replacement (`bootstrap`, whose names are re-exported
here): `bootstrap_power_law` refits the law to every resample of the SAEs' pooled FVUs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import least_squares

from darkmatter.errors import ConfigError, DataError
from darkmatter.experiments.bootstrap import (
    BootstrapEstimate,
    RatioBootstrap,
    bootstrap_fvu,
    bootstrap_ratio,
    check_config,
    full_data,
    pooled_ratio,
    resample_contexts,
)
from darkmatter.ranks import SINGLE, Ranks

__all__ = [
    "BootstrapEstimate",
    "PowerLawBootstrap",
    "PowerLawFit",
    "RatioBootstrap",
    "bootstrap_fvu",
    "bootstrap_power_law",
    "bootstrap_ratio",
    "fit_power_law",
    "pooled_ratio",
    "resample_contexts",
]

# Bounds on the dimensionless curvature κ = m·max|u|: κ → 0 is a flat line, κ → ∞ a step.
_KAPPA_LO, _KAPPA_HI = 1e-6, 50.0
_M_MAX = 20.0  # keeps a = A·W̄^m finite for any realistic width
_A_LO, _A_HI = 1e-12, 1e6  # on A, in units of max|FVU|
_GRID = np.geomspace(1e-3, _KAPPA_HI, 64)  # κ grid of the profile start
_RESTART_KAPPA = (1e-2, 20.0)  # range the seeded restarts draw κ from
# A fit whose decline over the measured widths is below this (in units of max|FVU|) is flat: not converged.
_NEGLIGIBLE_DROP = 1e-6
_TOL = 1e-12


@dataclass(frozen=True)
class PowerLawFit:
    """FVU(W) ≈ c + a·W^(−m). `rmse` is weighted when weights were given; `converged` is False when the
    solver failed or the optimum is degenerate (no decline over the measured widths, or m at a bound)."""

    c: float
    a: float
    m: float
    rmse: float
    converged: bool

    @overload
    def predict(self, w: float) -> float: ...
    @overload
    def predict(self, w: np.ndarray | Sequence[float]) -> np.ndarray: ...
    def predict(self, w: ArrayLike) -> float | np.ndarray:
        """The fitted FVU at width(s) `w`: a float for a scalar, an array of the same shape otherwise."""
        wa = np.asarray(w, dtype=np.float64)
        # exp(log a − m·log w) rather than a·w^(−m): finite even where a alone would overflow.
        out = self.c + np.exp(np.log(self.a) - self.m * np.log(wa))
        return float(out) if out.ndim == 0 else out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "c": float(self.c),
            "a": float(self.a),
            "m": float(self.m),
            "rmse": float(self.rmse),
            "converged": bool(self.converged),
        }


@dataclass(frozen=True)
class PowerLawBootstrap:
    """The full-data fit, bootstrap summaries of c, a, m and of each SAE's FVU, and the raw refits."""

    widths: tuple[float, ...]
    fit: PowerLawFit
    c: BootstrapEstimate
    a: BootstrapEstimate
    m: BootstrapEstimate
    fvu: tuple[BootstrapEstimate, ...]  # one per SAE, in input order
    samples: tuple[tuple[float, float, float], ...]  # (c, a, m) of each refit
    n_converged: int  # refits with converged=True
    n_boot: int
    ci: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "widths": list(self.widths),
            "fit": self.fit.to_dict(),
            "c": self.c.to_dict(),
            "a": self.a.to_dict(),
            "m": self.m.to_dict(),
            "fvu": [e.to_dict() for e in self.fvu],
            "samples": [list(s) for s in self.samples],
            "n_converged": self.n_converged,
            "n_boot": self.n_boot,
            "ci": self.ci,
            "seed": self.seed,
        }


# ----------------------------------------------------------------------------------------------- fit


def _vector(name: str, values: ArrayLike) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"power-law fit: {name} must be a sequence of numbers ({e}).") from e
    if arr.ndim != 1:
        raise DataError(f"power-law fit: {name} must be one-dimensional, found shape {arr.shape}.")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise DataError(
            f"power-law fit: {name} has non-finite values (NaN or inf) at positions {bad.tolist()}; "
            "drop or recompute those points."
        )
    return arr


@dataclass(frozen=True)
class _Problem:
    """Normalised data: model y ≈ c + A·exp(−m·u), residuals scaled by sqrt(weights)."""

    u: np.ndarray  # [n] centred log-width
    y: np.ndarray  # [n] fvu / scale
    w: np.ndarray  # [n] weights, summing to n
    x_mean: float
    scale: float
    h: float  # max |u|
    m_lo: float
    m_hi: float

    @property
    def sw(self) -> np.ndarray:
        return np.sqrt(self.w)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.array([0.0, math.log(_A_LO), math.log(self.m_lo)])
        hi = np.array([np.inf, math.log(_A_HI), math.log(self.m_hi)])
        return lo, hi

    def residuals(self, theta: np.ndarray) -> np.ndarray:
        c, A, m = theta[0], math.exp(theta[1]), math.exp(theta[2])
        return self.sw * (c + A * np.exp(-m * self.u) - self.y)

    def jacobian(self, theta: np.ndarray) -> np.ndarray:
        A, m = math.exp(theta[1]), math.exp(theta[2])
        term = A * np.exp(-m * self.u)
        return self.sw[:, None] * np.stack([np.ones_like(term), term, -m * self.u * term], axis=1)


def _problem(widths: ArrayLike, fvu: ArrayLike, weights: ArrayLike | None) -> _Problem:
    W = _vector("widths", widths)
    y = _vector("fvu", fvu)
    if W.shape != y.shape:
        raise DataError(f"power-law fit: {W.size} widths but {y.size} FVU values; pass one FVU per width.")
    if np.any(W <= 0):
        raise DataError(f"power-law fit: widths must be positive, found {W[W <= 0].tolist()}.")
    if weights is None:
        w = np.ones_like(y)
    else:
        w = _vector("weights", weights)
        if w.shape != y.shape:
            raise DataError(
                f"power-law fit: {w.size} weights for {y.size} points; pass one weight per point."
            )
        if np.any(w < 0):
            raise DataError("power-law fit: weights must be non-negative.")
    used = w > 0  # zero-weight points do not enter the fit
    W, y, w = W[used], y[used], w[used]
    n_distinct = np.unique(W).size
    if n_distinct < 3:
        raise DataError(
            f"power-law fit: c + a·W^(−m) has 3 parameters but the data have {n_distinct} distinct width(s) "
            "with positive weight; at least 3 are needed."
        )
    x = np.log(W)
    x_mean = float(np.average(x, weights=w))
    u = x - x_mean
    h = float(np.abs(u).max())
    scale = float(np.abs(y).max()) or 1.0
    m_lo = _KAPPA_LO / h
    m_hi = max(min(_KAPPA_HI / h, _M_MAX), 10 * m_lo)
    return _Problem(u, y / scale, w * (w.size / w.sum()), x_mean, scale, h, m_lo, m_hi)


def _profile(p: _Problem, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each m: [G], the weighted least squares (c ≥ 0, A ≥ 0) with m fixed, in closed form.

    Returns sse, c, A, each [G]. The 2-variable NNLS is solved by trying every active set.
    """
    g = np.exp(-np.outer(m, p.u))  # [G, n]
    w, y = p.w, p.y
    sw, sy = w.sum(), w @ y
    sg, sgg, sgy = g @ w, (g * g) @ w, g @ (w * y)
    with np.errstate(divide="ignore", invalid="ignore"):
        det = sw * sgg - sg**2
        cands = [
            ((sgg * sy - sg * sgy) / det, (sw * sgy - sg * sy) / det),  # both free
            (np.zeros_like(m), np.maximum(sgy / sgg, 0.0)),  # c = 0
            (np.full_like(m, max(sy / sw, 0.0)), np.zeros_like(m)),  # A = 0
        ]
    best = np.full(m.shape, np.inf)
    best_c, best_A = np.zeros_like(m), np.zeros_like(m)
    for c, A in cands:
        ok = np.isfinite(c) & np.isfinite(A) & (c >= 0) & (A >= 0)
        r = y[None, :] - np.where(ok, c, 0)[:, None] - np.where(ok, A, 0)[:, None] * g
        sse = np.where(ok, (r * r) @ w, np.inf)
        take = sse < best
        best, best_c, best_A = np.where(take, sse, best), np.where(take, c, best_c), np.where(take, A, best_A)
    return best, best_c, best_A


def _starts(p: _Problem, n_restarts: int, seed: int) -> list[np.ndarray]:
    """The profile-grid optimum, then `n_restarts` seeded starts: log-stratified κ, c in [0, min y)."""
    lo, hi = p.bounds()
    m_grid = np.clip(_GRID / p.h, p.m_lo, p.m_hi)
    sse, c, A = _profile(p, m_grid)
    i = int(np.argmin(sse))
    thetas = [np.array([c[i], math.log(max(A[i], _A_LO)), math.log(m_grid[i])])]
    if n_restarts:
        rng = np.random.default_rng(seed)
        k = n_restarts
        edges = np.linspace(math.log(_RESTART_KAPPA[0]), math.log(_RESTART_KAPPA[1]), k + 1)
        m0 = np.clip(np.exp(edges[:-1] + rng.random(k) * np.diff(edges)) / p.h, p.m_lo, p.m_hi)
        frac = (np.arange(k) + rng.random(k)) / k
        rng.shuffle(frac)
        c0 = frac * max(float(p.y.min()), 0.0)
        g = np.exp(-np.outer(m0, p.u))  # [k, n]
        A0 = (g @ (p.w * p.y) - c0 * (g @ p.w)) / ((g * g) @ p.w)
        A0 = np.clip(np.nan_to_num(A0, nan=_A_LO), _A_LO, _A_HI)
        thetas += [np.array([c0[j], math.log(A0[j]), math.log(m0[j])]) for j in range(k)]
    return [np.clip(t, lo, hi) for t in thetas]


def _solve(p: _Problem, starts: list[np.ndarray]) -> tuple[np.ndarray, float, bool]:
    """Polish every start with trust-region least squares; keep the lowest SSE (first on ties)."""
    lo, hi = p.bounds()
    best: tuple[np.ndarray, float, bool] | None = None
    for theta0 in starts:
        res = least_squares(
            p.residuals,
            theta0,
            jac=p.jacobian,
            bounds=(lo, hi),
            method="trf",
            x_scale="jac",
            ftol=_TOL,
            xtol=_TOL,
            gtol=_TOL,
            max_nfev=100,
        )
        sse = float(res.fun @ res.fun)
        if best is None or sse < best[1]:
            best = (res.x, sse, bool(res.status > 0))
    assert best is not None
    return best


def _finish(p: _Problem, theta: np.ndarray, sse: float, success: bool) -> PowerLawFit:
    c, A, m = float(theta[0]), math.exp(theta[1]), math.exp(theta[2])
    drop = A * (math.exp(-m * float(p.u.min())) - math.exp(-m * float(p.u.max())))
    at_bound = theta[2] <= math.log(p.m_lo) + 1e-3 or theta[2] >= math.log(p.m_hi) - 1e-3
    converged = success and drop > _NEGLIGIBLE_DROP and not at_bound
    # Undo the normalisation: A·exp(−m·u) = A·W̄^m·W^(−m), so a = scale·A·exp(m·x̄).
    with np.errstate(over="ignore"):
        a = p.scale * float(np.exp(theta[1] + m * p.x_mean))  # inf only for widths beyond ~1e15
    converged = converged and math.isfinite(a)
    rmse = p.scale * math.sqrt(sse / p.w.sum())
    return PowerLawFit(c=p.scale * c, a=a, m=m, rmse=rmse, converged=converged)


def fit_power_law(
    widths: ArrayLike,
    fvu: ArrayLike,
    *,
    weights: ArrayLike | None = None,
    n_restarts: int = 16,
    seed: int = 0,
) -> PowerLawFit:
    """Fit FVU(W) = c + a·W^(−m) with c ≥ 0, a > 0, m > 0 by (weighted) nonlinear least squares.

    Starts: the optimum over a fixed 64-point grid of m with (c, a) solved exactly, plus `n_restarts`
    seeded starts; the lowest SSE wins. The grid start makes the answer seed-independent up to solver
    tolerance. Three distinct widths interpolate; fewer are a DataError. Data that do not decline with W
    still get the best constrained fit (a ≈ 0, c ≈ mean) with converged=False.
    """
    return _fit(widths, fvu, weights, n_restarts, seed)


def _fit(
    widths: ArrayLike,
    fvu: ArrayLike,
    weights: ArrayLike | None,
    n_restarts: int,
    seed: int,
    warm: PowerLawFit | None = None,
) -> PowerLawFit:
    """`fit_power_law`, optionally also starting from `warm` (a fit to similar data at the same widths)."""
    if isinstance(n_restarts, bool) or not isinstance(n_restarts, int) or n_restarts < 0:
        raise ConfigError(f"fit_power_law: n_restarts must be an integer >= 0, got {n_restarts!r}.")
    p = _problem(widths, fvu, weights)
    starts = _starts(p, n_restarts, seed)
    if warm is not None:
        lo, hi = p.bounds()
        theta = [warm.c / p.scale, math.log(warm.a / p.scale) - warm.m * p.x_mean, math.log(warm.m)]
        starts.append(np.clip(np.nan_to_num(np.array(theta)), lo, hi))
    return _finish(p, *_solve(p, starts))


# ------------------------------------------------------------------------------------------ bootstrap


def bootstrap_power_law(
    widths: ArrayLike,
    sse_per_context: np.ndarray,
    sum_x_per_context: np.ndarray,
    sum_sq_x_per_context: np.ndarray,
    n_per_context: np.ndarray,
    *,
    n_boot: int = 200,
    seed: int = 0,
    ci: float = 0.95,
    weights: ArrayLike | None = None,
    n_restarts: int = 4,
    ranks: Ranks = SINGLE,
) -> PowerLawBootstrap:
    """Fit the power law to the full-data FVUs and refit it to each context resample.

    widths: [n_sae]; sse_per_context: [n_sae, n_ctx]; the other sums as in `pooled_ratio`. Each refit
    starts from the profile grid, the full-data optimum and `n_restarts` seeded points (fewer than
    `fit_power_law`'s default: the warm start lies next to the resample's optimum). All refits use the
    same restart seed, so the result is a deterministic function of the inputs and `seed`. ``ranks``: under
    torchrun each rank refits its share of the resamples (every rank must call this; the result is the
    same on every rank and equals the one-process result).
    """
    check_config(n_boot, ci)
    sums = (sum_x_per_context, sum_sq_x_per_context, n_per_context)
    sse = np.asarray(sse_per_context, dtype=np.float64)
    n_sae = np.size(widths)
    if sse.ndim != 2 or sse.shape[0] != n_sae:
        raise DataError(
            f"bootstrap: sse_per_context must be [n_sae={n_sae}, n_ctx], found shape {sse.shape}."
        )
    point = bootstrap_fvu(sse, *sums, multiplicities=full_data(sse.shape[1]))[0]  # [n_sae]
    fit = fit_power_law(widths, point, weights=weights, seed=seed)
    boot = bootstrap_fvu(sse, *sums, n_boot=n_boot, seed=seed)  # [n_boot, n_sae]

    def refit(i: int) -> list[float]:
        f = _fit(widths, boot[i], weights, n_restarts, seed, warm=fit)
        return [f.c, f.a, f.m, float(f.converged)]

    refits = ranks.rows(len(boot), 4, refit)
    cam = refits[:, :3]  # [n_boot, 3]
    c, a, m = (BootstrapEstimate.from_samples(v, cam[:, k], ci) for k, v in enumerate((fit.c, fit.a, fit.m)))
    return PowerLawBootstrap(
        widths=tuple(float(w) for w in np.ravel(widths)),
        fit=fit,
        c=c,
        a=a,
        m=m,
        fvu=tuple(BootstrapEstimate.from_samples(point[j], boot[:, j], ci) for j in range(point.size)),
        samples=tuple((float(r[0]), float(r[1]), float(r[2])) for r in cam),
        n_converged=int(refits[:, 3].sum()),
        n_boot=n_boot,
        ci=ci,
        seed=seed,
    )
