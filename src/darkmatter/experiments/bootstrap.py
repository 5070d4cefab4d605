"""Bootstrap over contexts: resample contexts with replacement and recompute pooled ratios such as FVU.

Every SAE's FVU is a ratio of per-context sums, so a resample is a vector of context multiplicities and all
resampled FVUs are one matrix product. The same seed gives the same resamples in every function here (and in
`powerlaw.bootstrap_power_law`), so bands computed separately (the power law, a horizontal FVU_nonlinear
line) are resampled jointly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from darkmatter.errors import ConfigError, DataError

__all__ = [
    "BootstrapEstimate",
    "RatioBootstrap",
    "bootstrap_fvu",
    "bootstrap_ratio",
    "pooled_ratio",
    "resample_contexts",
]


@dataclass(frozen=True)
class BootstrapEstimate:
    """One quantity: the full-data estimate, the bootstrap mean and std, and the percentile interval."""

    point: float
    mean: float
    std: float
    low: float
    high: float

    @classmethod
    def from_samples(cls, point: float, samples: np.ndarray, ci: float) -> BootstrapEstimate:
        """samples: [n_boot]."""
        lo, hi = np.quantile(samples, [(1 - ci) / 2, (1 + ci) / 2])
        return cls(float(point), float(samples.mean()), float(samples.std(ddof=1)), float(lo), float(hi))

    def to_dict(self) -> dict[str, float]:
        """A JSON-ready copy."""
        return {"point": self.point, "mean": self.mean, "std": self.std, "low": self.low, "high": self.high}


@dataclass(frozen=True)
class RatioBootstrap:
    """Bootstrap summaries of each series' pooled ratio and of their unweighted mean (a horizontal line)."""

    series: tuple[BootstrapEstimate, ...]
    average: BootstrapEstimate
    n_boot: int
    ci: float
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {
            "series": [e.to_dict() for e in self.series],
            "average": self.average.to_dict(),
            "n_boot": self.n_boot,
            "ci": self.ci,
            "seed": self.seed,
        }


def check_config(n_boot: int, ci: float) -> None:
    """ConfigError unless ``n_boot`` is an integer >= 2 and 0 < ``ci`` < 1."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 2:
        raise ConfigError(f"bootstrap: n_boot must be an integer >= 2, got {n_boot!r}.")
    if not 0 < ci < 1:
        raise ConfigError(f"bootstrap: ci must lie strictly between 0 and 1, got {ci!r}.")


def _array(name: str, values: ArrayLike, ndim: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != ndim:
        raise DataError(f"bootstrap: {name} must be {ndim}-dimensional, found shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise DataError(
            f"bootstrap: {name} has non-finite values (NaN or inf); recompute the per-context sums."
        )
    return arr


def resample_contexts(n_ctx: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """Multiplicities of each context in `n_boot` with-replacement resamples of `n_ctx`: [n_boot, n_ctx].

    Counts of a with-replacement draw are Multinomial(n_ctx, uniform); one call draws them all.
    """
    if n_ctx < 1:
        raise DataError("bootstrap: there are no contexts to resample.")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_ctx, np.full(n_ctx, 1.0 / n_ctx), size=n_boot)


def pooled_ratio(
    num_per_context: np.ndarray,
    sum_x_per_context: np.ndarray,
    sum_sq_x_per_context: np.ndarray,
    n_per_context: np.ndarray,
    multiplicities: np.ndarray,
) -> np.ndarray:
    """Σ_c w_c·num_c / (Σ_c w_c·SSQ_c − ‖Σ_c w_c·SX_c‖² / Σ_c w_c·n_c): [n_boot, n_series].

    num_per_context: [n_series, n_ctx]; sum_x_per_context: [n_ctx, d]; sum_sq_x_per_context, n_per_context:
    [n_ctx]; multiplicities: [n_boot, n_ctx] (w). The denominator is the total sum of squares of x about its
    per-dimension mean over the resampled tokens, so num = per-context SSE gives the pooled FVU. It is
    shift-invariant: sums taken about any fixed vector (e.g. an approximate mean) give the same answer with
    less cancellation when ‖mean‖² ≫ variance.
    """
    num = _array("num_per_context", num_per_context, 2)
    sx = _array("sum_x_per_context", sum_x_per_context, 2)
    ssq = _array("sum_sq_x_per_context", sum_sq_x_per_context, 1)
    n = _array("n_per_context", n_per_context, 1)
    w = _array("multiplicities", multiplicities, 2)
    n_ctx = num.shape[1]
    for name, size in (
        ("sum_x_per_context", sx.shape[0]),
        ("sum_sq_x_per_context", ssq.shape[0]),
        ("n_per_context", n.shape[0]),
        ("multiplicities", w.shape[1]),
    ):
        if size != n_ctx:
            raise DataError(
                f"bootstrap: num_per_context has {n_ctx} contexts but {name} has {size}; "
                "all per-context arrays must index the same contexts."
            )
    if np.any(n < 0) or np.any(w < 0):
        raise DataError("bootstrap: token counts and multiplicities must be non-negative.")
    tokens = w @ n  # [n_boot]
    sx_w = w @ sx  # [n_boot, d]
    with np.errstate(divide="ignore", invalid="ignore"):
        den = w @ ssq - np.einsum("bd,bd->b", sx_w, sx_w) / tokens  # [n_boot]
    bad = np.flatnonzero(~(den > 0) | ~(tokens > 0))
    if bad.size:
        raise DataError(
            f"bootstrap: resample(s) {bad[:5].tolist()} have no tokens or no variance in x "
            f"(total sum of squares {den[bad[0]]!r}); check sum_sq_x_per_context and n_per_context."
        )
    return (w @ num.T) / den[:, None]


def bootstrap_fvu(
    sse_per_context: np.ndarray,
    sum_x_per_context: np.ndarray,
    sum_sq_x_per_context: np.ndarray,
    n_per_context: np.ndarray,
    *,
    n_boot: int = 200,
    seed: int = 0,
    multiplicities: np.ndarray | None = None,
) -> np.ndarray:
    """Pooled FVU of every SAE in every context resample: [n_boot, n_sae].

    sse_per_context: [n_sae, n_ctx] Σ_t ‖x − x̂‖² per context; the x sums are shared by all SAEs. Pass
    `multiplicities` ([n_boot, n_ctx]) to evaluate given resamples instead (all ones = the full data).
    """
    sse = np.asarray(sse_per_context, dtype=np.float64)
    if multiplicities is None:
        if sse.ndim != 2:
            raise DataError(f"bootstrap: sse_per_context must be [n_sae, n_ctx], found shape {sse.shape}.")
        if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
            raise ConfigError(f"bootstrap: n_boot must be a positive integer, got {n_boot!r}.")
        multiplicities = resample_contexts(sse.shape[1], n_boot, seed)
    return pooled_ratio(sse, sum_x_per_context, sum_sq_x_per_context, n_per_context, multiplicities)


def full_data(n_ctx: int) -> np.ndarray:
    """The multiplicities [1, n_ctx] of the full data set: every context once."""
    return np.ones((1, n_ctx))


def bootstrap_ratio(
    num_per_context: np.ndarray,
    sum_x_per_context: np.ndarray,
    sum_sq_x_per_context: np.ndarray,
    n_per_context: np.ndarray,
    *,
    n_boot: int = 200,
    seed: int = 0,
    ci: float = 0.95,
) -> RatioBootstrap:
    """Bootstrap CIs of each series' pooled ratio (see `pooled_ratio`) and of the mean over series.

    E.g. num = per-context Σ‖NonlinearError‖² of each SAE gives FVU_nonlinear per SAE and the CI of the
    horizontal line drawn at their average.
    """
    check_config(n_boot, ci)
    sums = (sum_x_per_context, sum_sq_x_per_context, n_per_context)
    num = np.asarray(num_per_context, dtype=np.float64)
    point = bootstrap_fvu(num, *sums, multiplicities=full_data(num.shape[-1]))[0]  # [n_series]
    boot = bootstrap_fvu(num, *sums, n_boot=n_boot, seed=seed)  # [n_boot, n_series]
    series = tuple(BootstrapEstimate.from_samples(point[j], boot[:, j], ci) for j in range(point.size))
    average = BootstrapEstimate.from_samples(float(point.mean()), boot.mean(axis=1), ci)
    return RatioBootstrap(series=series, average=average, n_boot=n_boot, ci=ci, seed=seed)
