"""The trainable state of one SAE of a family, and the geometric median that initialises its ``b_dec``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from darkmatter.sae.train_config import SAESpec

Tensor = torch.Tensor


@dataclass
class Member:
    """Trainable state of one SAE in the family."""

    spec: SAESpec
    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    opt: torch.optim.Adam
    lr: float
    since_fired: Tensor  # [d_sae] tokens since each latent last fired
    threshold: Tensor  # scalar running BatchTopK inference threshold (EMA)
    history: list[dict[str, float]] = field(default_factory=list)  # step, fvu, l0, aux, dead_fraction
    log_threshold: Tensor | None = None  # JumpReLU: learnt log θ [d_sae] (scaled-input units)
    sparsity_coef: float = 0.0  # JumpReLU: the L0 penalty's λ, adapted towards the target L0

    def encoder_bias(self) -> Tensor:
        """``b_enc − b_dec·W_enc``: pre-activations are ``x·W_enc`` plus this. Written so autograd does not
        form the ``[n, d]`` input gradient (a wasted 2·n·d·w GEMM): b_dec's encoder-side gradient comes from a
        vector-matrix product instead."""
        return self.b_enc - self.b_dec @ self.W_enc

    def params(self) -> list[Tensor]:
        extra = [] if self.log_threshold is None else [self.log_threshold]
        return [self.W_enc, self.b_enc, self.W_dec, self.b_dec, *extra]


def geometric_median(x: Tensor, iters: int = 50, eps: float = 1e-6) -> Tensor:
    """Weiszfeld iterations for the point minimising the sum of Euclidean distances to rows of x."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() < eps * max(1.0, float(y.norm())):
            return y_new
        y = y_new
    return y
