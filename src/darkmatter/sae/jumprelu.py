"""JumpReLU SAE training as in Rajamanoharan et al. 2024 ("Jumping Ahead"), the recipe of Gemma Scope.

Codes ``f = z · H(z − θ)`` with ``z = (x − b_dec) W_enc + b_enc`` and a learnt per-latent threshold
``θ = exp(log θ)``. The Heaviside step has a zero derivative almost everywhere, so θ learns through
straight-through estimators with a rectangle kernel ``K(u) = 1[|u| < 1/2]`` of bandwidth ε:

- reconstruction term: ``∂f/∂θ := −(θ/ε) K((z − θ)/ε)`` and ``∂f/∂z = H(z − θ)``;
- L0 penalty ``λ · Σ_i H(z_i − θ_i)`` (mean over tokens): ``∂H/∂θ := −(1/ε) K((z − θ)/ε)``, nothing to z.

Units: the trainer scales inputs to ``E‖x‖² = d_in``; the paper's ε = 0.001 is for inputs of unit mean
squared norm, so the bandwidth here is ``0.001 · sqrt(d_in)``: the same width relative to the inputs.

Sparsity: the spec's ``k`` is the target mean L0. A fixed λ gives an L0 known only after training (Gemma
Scope swept λ, warmed up linearly, per SAE); comparing a JumpReLU SAE with a TopK SAE needs them at the same
L0, so λ is adapted instead: after every step ``λ ← λ · exp(η · clamp(log(L0 / k), ±1))``, a multiplicative
integral controller on the batch L0. It settles while the learning rate is still high; in the final linear
decay the weights (and so the L0) move less and less.

Thresholds start at each latent's ``1 − k/d_sae`` quantile of its pre-activations on the first batch, so
every latent fires on about ``k/d_sae`` of the tokens and the mean L0 is ``k`` from the first step (like
TopK). The paper starts at θ = 0.001; log θ then moves by about the learning rate per step, far too slowly
for the short budgets of a study. Decoder rows are kept at unit norm as for TopK.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from darkmatter.sae.member import Member

Tensor = torch.Tensor

BANDWIDTH = 0.001  # ε for inputs of unit mean squared norm (the paper's); multiplied by sqrt(d_in) here
INITIAL_COEF = 1e-3  # λ at the first step, in FVU per active latent
COEF_RATE = 0.05  # η of the λ controller (per step, on log λ)
MIN_COEF = 1e-5  # floor of λ: early on the reconstruction alone pulls the L0 below k, and a λ wound down
# to nothing would take hundreds of steps to climb back once the L0 overshoots late in training


def bandwidth(d_in: int) -> float:
    """ε in the trainer's units (inputs scaled to ``E‖x‖² = d_in``)."""
    return BANDWIDTH * math.sqrt(d_in)


def _kernel(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    return ((z - theta).abs() < eps / 2).to(z.dtype)


class _JumpReLU(torch.autograd.Function):
    """``z · H(z − θ)`` with the pseudo-derivative ``−(θ/ε) K((z − θ)/ε)`` for θ."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:
        z, theta = ctx.saved_tensors
        g_theta = (-(theta / ctx.eps) * _kernel(z, theta, ctx.eps) * g).sum(0)
        return (z > theta) * g, g_theta, None


class _Step(torch.autograd.Function):
    """``H(z − θ)`` with the pseudo-derivative ``−(1/ε) K((z − θ)/ε)`` for θ and none for z."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor, None]:
        z, theta = ctx.saved_tensors
        return None, (-(1.0 / ctx.eps) * _kernel(z, theta, ctx.eps) * g).sum(0), None


def jumprelu(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """JumpReLU codes of pre-activations ``z [n, w]`` with thresholds ``θ [w]`` (STE for θ)."""
    return _JumpReLU.apply(z, theta, eps)  # type: ignore[no-any-return]


def step(z: Tensor, theta: Tensor, eps: float) -> Tensor:
    """``H(z − θ)`` as floats (STE for θ, no gradient to z)."""
    return _Step.apply(z, theta, eps)  # type: ignore[no-any-return]


@torch.no_grad()
def initial_log_threshold(pre: Tensor, k: int, eps: float) -> Tensor:
    """log θ at each latent's ``1 − k/w`` quantile of pre-activations ``pre [n, w]`` (at least ε)."""
    n, w = pre.shape
    fire = min(n - 1, max(1, round(n * k / w)))  # tokens each latent fires on
    theta = pre.kthvalue(n - fire, dim=0).values
    return theta.clamp_min(eps).log()


def forward(m: Member, x: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(reconstruction [n, d], codes [n, w], L0 penalty without λ summed over the rows, pre-activations)
    of scaled inputs x; ``bias``: the member's ``encoder_bias`` where already formed."""
    assert m.log_threshold is not None
    eps = bandwidth(x.shape[1])
    pre = torch.addmm(m.encoder_bias() if bias is None else bias, x, m.W_enc)
    theta = m.log_threshold.exp()
    codes = jumprelu(pre, theta, eps)
    penalty = step(pre, theta, eps).sum()
    return torch.addmm(m.b_dec, codes, m.W_dec), codes, penalty, pre


def adapt_coef(coef: float, l0: float, k: int) -> float:
    """The next λ: up when the batch L0 is above the target ``k``, down when below."""
    ratio = math.log(max(l0, 1e-3) / k)
    return max(MIN_COEF, coef * math.exp(COEF_RATE * max(-1.0, min(1.0, ratio))))
