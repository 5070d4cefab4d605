"""Exact held-out evaluation: a fit scored on the test split's own `Moments`, without revisiting tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from darkmatter.errors import ConfigError, DataError, ShapeError
from darkmatter.stats.moments import Moments
from darkmatter.stats.ridge import RidgeFit

Tensor = torch.Tensor
F64 = torch.float64

CONSTANT_TARGET_TOL = 1e-20
"""A target dimension is constant when SS_tot <= this × Σy² on the evaluated tokens.

Float64 round-off on a truly constant column leaves SS_tot around 1e-32·Σy²; a float32 column that varies
by a single ulp has SS_tot/Σy² near 1e-14, so the threshold separates the two by six orders of magnitude."""


@dataclass(frozen=True)
class HeldOutEval:
    """A fit scored exactly on another split's moments, per output dimension and pooled.

    Constant target dimensions (SS_tot <= CONSTANT_TARGET_TOL·Σy²) have no R²: they get NaN in
    `r2_per_dim`, are left out of `r2_mean_over_dims` and counted in `constant_dims`; their SS_res still
    counts in `r2_variance_weighted` and FVU. If every dimension is constant, `evaluate` raises DataError.
    """

    n_test: int
    ss_res: Tensor
    """[d_y] Σ_t (y − ŷ)² on the test tokens."""
    ss_tot: Tensor
    """[d_y] Σ_t (y − ȳ)², ȳ the test-split mean."""
    sum_sq: Tensor
    """[d_y] Σ_t y² (uncentred). For y = e = x − Sae(x), Σ sum_sq / SS_tot(x) is the SAE's own FVU."""
    r2_per_dim: Tensor
    """[d_y] 1 − ss_res/ss_tot; NaN for constant dimensions."""
    constant_dims: int
    r2_mean_over_dims: float
    """Unweighted mean of per-dimension R² over non-constant dims (the paper's vector-probe R²)."""
    r2_variance_weighted: float
    """1 − Σ ss_res / Σ ss_tot over all dims."""

    @property
    def r2(self) -> float:
        """Ordinary R² of a scalar target (d_y == 1)."""
        if self.ss_res.numel() != 1:
            raise ShapeError(
                f"HeldOutEval.r2 is for a scalar target; this one has d_y={self.ss_res.numel()}: "
                "use r2_mean_over_dims or r2_variance_weighted"
            )
        return float(self.r2_per_dim[0])


def evaluate(fit: RidgeFit, moments: Moments, target: str) -> HeldOutEval:
    """Score `fit` on the tokens behind `moments` (the test split) without revisiting them.

    SS_res = Σy² − 2·diag(BᵀC) + diag(BᵀGB) per output dim, computed in its centred form
    SS_tot − 2·diag(WᵀCc) + diag(WᵀGcW) + n·(ȳ − x̄W − b)², which is the same quantity without the
    cancellation of raw moments. Negative round-off (a near-perfect fit) is clamped to 0.
    """
    dims = moments.target_dims
    if target not in dims:
        raise ConfigError(f"evaluate: unknown target {target!r}; declared targets are {sorted(dims)}")
    n = moments.n
    if n < 2:
        raise DataError(f"evaluate: {n} test token(s); R² about the test mean needs at least 2")
    if tuple(fit.weights.shape) != (moments.d_x, dims[target]):
        raise ShapeError(
            f"evaluate: fit weights have shape {list(fit.weights.shape)}, expected "
            f"[{moments.d_x}, {dims[target]}] for target {target!r}"
        )
    gc = moments.centred_gram()
    device = gc.device
    w = fit.weights.to(device=device, dtype=F64)
    b = fit.bias.to(device=device, dtype=F64) if fit.bias is not None else torch.zeros_like(w[0])
    ss_tot = moments.target_ss_tot(target)
    offset = moments.mean_target(target) - moments.mean_x() @ w - b
    quad = ((gc @ w) * w).sum(0)
    lin = (moments.centred_cross(target) * w).sum(0)
    ss_res = (ss_tot - 2 * lin + quad + n * offset * offset).clamp_min(0)
    sum_sq = moments.target_sum_sq(target)
    constant = ss_tot <= CONSTANT_TARGET_TOL * sum_sq
    n_constant = int(constant.sum())
    if n_constant == ss_tot.numel():
        raise DataError(
            f"evaluate: all {n_constant} dimension(s) of target {target!r} are constant on the {n} test "
            "tokens; R² is undefined"
        )
    r2 = torch.where(constant, torch.nan, 1 - ss_res / torch.where(constant, 1.0, ss_tot))
    return HeldOutEval(
        n_test=n,
        ss_res=ss_res,
        ss_tot=ss_tot,
        sum_sq=sum_sq,
        r2_per_dim=r2,
        constant_dims=n_constant,
        r2_mean_over_dims=float(r2[~constant].mean()),
        r2_variance_weighted=float(1 - ss_res.sum() / ss_tot.sum()),
    )


def fvu_with_prediction(evaluation: HeldOutEval, x_total_variance: float) -> float:
    """FVU(x, Sae(x) + ŷ) on the test tokens, where ŷ predicts the target e = x − Sae(x).

    x − Sae(x) − ŷ = e − ŷ, so the numerator is exactly Σ ss_res; `x_total_variance` is Σ_t ‖x_t − x̄‖²
    over the same test tokens (`Moments.total_variance_x()` of the test split when x is the input).
    """
    if not (math.isfinite(x_total_variance) and x_total_variance > 0):
        raise DataError(
            f"fvu_with_prediction: total variance of x must be finite and > 0, found {x_total_variance}"
        )
    return float(evaluation.ss_res.sum()) / x_total_variance
