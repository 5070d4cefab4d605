"""The ridge solve: linear fits of named targets from train-split `Moments`, one Cholesky for all."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from darkmatter.errors import ConfigError, DataError
from darkmatter.stats.checks import as_rows
from darkmatter.stats.moments import Moments

Tensor = torch.Tensor
F64 = torch.float64

DEFAULT_RELATIVE_RIDGE = 1e-10
"""Default λ as a fraction of the mean diagonal of the centred train Gram (see `fit_ridge`)."""


@dataclass(frozen=True)
class RidgeFit:
    """y ≈ x·weights + bias from minimising ‖x̃B − y‖² + ridge·‖weights‖² on train moments (float64)."""

    weights: Tensor
    """[d_x, d_y] float64."""
    bias: Tensor | None
    """[d_y] float64 intercept (never penalised), or None for a fit through the origin."""
    ridge: float
    """Absolute λ actually used, after any escalation."""
    ridge_scale: float
    """Mean diagonal of the centred train Gram; ridge / ridge_scale is the relative ridge."""
    escalations: int
    """How many times λ was multiplied by 10 because the Cholesky factorisation failed."""
    n_train: int
    """Train tokens the moments came from."""

    @property
    def relative_ridge(self) -> float:
        return self.ridge / self.ridge_scale

    def predict(self, x: Tensor) -> Tensor:
        """ŷ [tokens, d_y] float64 for x [tokens, d_x] on the fit's device."""
        x = as_rows("x", x, self.weights.shape[0]).to(device=self.weights.device, dtype=F64)
        y = x @ self.weights
        return y + self.bias if self.bias is not None else y


def fit_ridge_many(
    moments: Moments,
    targets: Sequence[str] | None = None,
    *,
    bias: bool = True,
    ridge: float | None = None,
    relative_ridge: float = DEFAULT_RELATIVE_RIDGE,
    max_escalations: int = 6,
) -> dict[str, RidgeFit]:
    """Fit every named target (default: all) against the shared Gram with one Cholesky factorisation.

    λ = `ridge` if given, else `relative_ridge` × mean diagonal of the centred Gram, with or without bias
    (the centred scale does not depend on how far x sits from the origin). The default 1e-10 keeps exactly
    rank-deficient inputs solvable for d_x up to ~10⁴ while moving W by at most ~1e-10·cond(Gc) relative.
    If the factorisation fails, λ is multiplied by 10 (or set to the default relative ridge if it was 0)
    up to `max_escalations` times; the λ used is reported in the fit. With bias the problem is solved in
    centred form, W = (Gc + λI)⁻¹Cc, b = ȳ − x̄W, which is the exact minimiser with an unpenalised bias.

    Raises DataError when n_train <= d_x (+1 with bias): such a fit is determined by the ridge, not the data.
    """
    names = list(moments.target_dims) if targets is None else list(targets)
    for name in names:
        if name not in moments.target_dims:
            raise ConfigError(
                f"fit_ridge: unknown target {name!r}; declared targets: {sorted(moments.target_dims)}"
            )
    if ridge is not None and not (math.isfinite(ridge) and ridge >= 0):
        raise ConfigError(f"fit_ridge: ridge must be a finite number >= 0, found {ridge}")
    if not (math.isfinite(relative_ridge) and relative_ridge >= 0):
        raise ConfigError(f"fit_ridge: relative_ridge must be a finite number >= 0, found {relative_ridge}")
    n, d = moments.n, moments.d_x
    n_params = d + int(bias)
    if n <= n_params:
        raise DataError(
            f"fit_ridge: {n} train tokens for {n_params} coefficients per output (d_x={d}"
            f"{' + bias' if bias else ''}); the fit would be set by the ridge, not the data. "
            "Accumulate more train tokens (typically >= 10x d_x)."
        )
    gc = moments.centred_gram()
    scale = float(gc.diagonal().mean())
    if not scale > 0:
        raise DataError(
            f"fit_ridge: every input dimension is constant over the {n} train tokens; nothing to regress on"
        )
    mx = moments.mean_x()
    a = gc if bias else gc + n * torch.outer(mx, mx)
    lam = float(ridge) if ridge is not None else relative_ridge * scale
    eye = torch.eye(d, dtype=F64, device=a.device)
    chol: Tensor | None = None
    escalations = 0
    for attempt in range(max_escalations + 1):
        factor, info = torch.linalg.cholesky_ex(a + lam * eye)
        if int(info) == 0 and bool(torch.isfinite(factor).all()):
            chol, escalations = factor, attempt
            break
        if attempt < max_escalations:
            lam = lam * 10 if lam > 0 else DEFAULT_RELATIVE_RIDGE * scale
    if chol is None:
        raise DataError(
            f"fit_ridge: Cholesky of the train Gram failed even with ridge {lam:.3g} "
            f"({lam / scale:.3g} relative); the inputs are badly scaled or not finite"
        )
    fits: dict[str, RidgeFit] = {}
    for name in names:
        my = moments.mean_target(name)
        rhs = moments.centred_cross(name)
        if not bias:
            rhs = rhs + n * torch.outer(mx, my)
        w = torch.cholesky_solve(rhs, chol)
        b = my - mx @ w if bias else None
        fits[name] = RidgeFit(
            weights=w, bias=b, ridge=lam, ridge_scale=scale, escalations=escalations, n_train=n
        )
    return fits


def fit_ridge(
    moments: Moments,
    target: str,
    *,
    bias: bool = True,
    ridge: float | None = None,
    relative_ridge: float = DEFAULT_RELATIVE_RIDGE,
    max_escalations: int = 6,
) -> RidgeFit:
    """Fit one named target; see `fit_ridge_many` for λ, escalation and the too-few-tokens rule."""
    return fit_ridge_many(
        moments,
        [target],
        bias=bias,
        ridge=ridge,
        relative_ridge=relative_ridge,
        max_escalations=max_escalations,
    )[target]
