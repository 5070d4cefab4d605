"""Inference-time gradient pursuit over a frozen SAE decoder (Smith 2024; the paper's §6.1 experiment).

For each token the pursuit fits non-negative coefficients ``w`` so that ``w @ W_dec`` approximates the target
``r0 = x' - b_dec``, where ``x'`` is the SAE's own transformed input (per-token ``normalize``, then
``* input_scale``, exactly as the encoder sees it; ``b_dec`` is always subtracted because the decoder always adds
it back). A token's budget is its L0 under the SAE's encoder, so the pursuit uses the SAE's sparsity token by
token. Each iteration, for tokens whose budget is not yet spent:

1. select the atom not in the support with the largest ``<r, d_j> / ||d_j||`` (zero-norm atoms never);
2. gradient on the support ``S`` (old support plus the new atom): ``g_j = <r, d_j>``;
3. exact line search along it: ``c = sum_S g_j d_j``, ``step = <r, c> / ||c||^2`` (0 when ``c = 0``);
4. ``w_S += step * g_S``, clamp to ``>= 0`` (clamped atoms leave the support), recompute ``r = r0 - w @ D``.

Choices against the original script (paper-experiments.md §8): selection excludes atoms already in the support
and divides by the atom norm (identical to the script's signed argmax when decoder rows are unit norm, and
invariant to rescaling atoms otherwise); ``c = 0`` gives step 0 instead of NaN. The support therefore grows by at
most one atom per iteration and never exceeds the budget. The result is unchanged by ``fold_input_scale()``
(the scale cancels in selection, gradient and step), so any ``input_scale`` and ``normalize`` are supported.

``gradient_pursuit`` keeps per-token ``(indices, values) [n, L]``; its only ``[n, d_sae]`` tensor is the inner
products ``r @ W_dec.T`` of one iteration. ``pursuit_dense`` is the plain dense reference used by tests and
``bench/bench_pursuit.py``. Both accumulate in float32 (float64 for float64 SAEs) on the SAE's device.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor

from darkmatter.errors import ConfigError, ShapeError
from darkmatter.sae.model import SAE, InputStats, SparseCodes


def compute_dtype(sae: SAE) -> torch.dtype:
    """float32, or float64 for a float64 SAE: half-precision SAEs are pursued in float32."""
    return torch.promote_types(sae.dtype, torch.float32)


def _flat(sae: SAE, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    d_in = sae.cfg.d_in
    if x.ndim == 0 or x.shape[-1] != d_in:
        raise ShapeError(f"Pursuit input must have last dimension d_in={d_in}, got shape {tuple(x.shape)}.")
    return x.reshape(-1, d_in).to(device=sae.device, dtype=sae.dtype), tuple(x.shape[:-1])


def _target(sae: SAE, x2d: Tensor, stats: InputStats | None, dtype: torch.dtype) -> Tensor:
    """``r0 = x' - b_dec [n, d_in]`` with ``x'`` transformed as the SAE's encoder input, in ``dtype``."""
    x = x2d.to(dtype)
    if stats is not None:
        x = (x - stats.shift.to(dtype)) / stats.scale.to(dtype)
    if sae.cfg.input_scale != 1.0:
        x = x * sae.cfg.input_scale
    return x - sae.b_dec.to(dtype)


def _budgets(sae: SAE, x2d: Tensor, budget: Tensor | None, lead: tuple[int, ...]) -> Tensor:
    """Per-token iteration budgets ``[n]`` int64: the encoder's L0 unless given."""
    if budget is None:
        return sae.encode_sparse(x2d).l0()
    if budget.is_floating_point() or budget.is_complex() or budget.dtype == torch.bool:
        raise ConfigError(f"budget must be an integer tensor of per-token L0s, got dtype {budget.dtype}.")
    if tuple(budget.shape) != lead:
        raise ShapeError(f"budget must have the input's token shape {lead}, got {tuple(budget.shape)}.")
    flat = budget.reshape(-1).to(device=sae.device, dtype=torch.long)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > sae.cfg.d_sae):
        raise ConfigError(
            f"budget entries must lie in [0, d_sae={sae.cfg.d_sae}], got [{int(flat.min())}, {int(flat.max())}]."
        )
    return flat


def _dictionary(sae: SAE, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(D [d_sae, d_in], 1/||d_j|| [d_sae], penalty [d_sae])``; penalty is -inf for zero-norm atoms, else 0."""
    D = sae.W_dec.detach().to(dtype).contiguous()
    norms = D.norm(dim=1)
    dead = norms == 0
    inv_norm = torch.where(dead, torch.zeros_like(norms), 1.0 / norms.clamp_min(torch.finfo(dtype).tiny))
    penalty = torch.zeros_like(norms).masked_fill_(dead, -math.inf)
    return D, inv_norm, penalty


def _spans(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
    if chunk_size is not None and chunk_size <= 0:
        raise ConfigError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    step = n if chunk_size is None else min(chunk_size, n)
    return [(i, min(i + step, n)) for i in range(0, n, step)] if n else []


def _line_step(r: Tensor, c: Tensor) -> Tensor:
    """Exact line-search step ``<r, c> / ||c||^2`` per row ``[n]``, 0 where ``c = 0``."""
    cc = (c * c).sum(dim=1)
    rc = (r * c).sum(dim=1)
    return torch.where(cc > 0, rc / cc.clamp_min(torch.finfo(cc.dtype).tiny), torch.zeros_like(cc))


# ---------------------------------------------------------------------------------------------- sparse


def _combine(idx: Tensor, D: Tensor, weights: Tensor, width: int) -> Tensor:
    """``sum_l weights[:, l] * D[idx[:, l]]`` -> ``[n, width]`` (no dense coefficient tensor)."""
    if idx.shape[1] == 0:
        return weights.new_zeros((idx.shape[0], width))
    return F.embedding_bag(idx, D, per_sample_weights=weights, mode="sum")


def _pursue_sparse(
    r0: Tensor, budget: Tensor, D: Tensor, inv_norm: Tensor, penalty: Tensor
) -> tuple[Tensor, Tensor]:
    """Sparse-support gradient pursuit of targets ``r0 [n, d_in]`` -> ``(indices, values) [n, max budget]``."""
    n, d_in = r0.shape
    steps = int(budget.max()) if n else 0
    idx = torch.zeros((n, steps), dtype=torch.long, device=r0.device)
    val = r0.new_zeros((n, steps))
    r = r0.clone()
    every = torch.arange(n, device=r0.device)
    for t in range(steps):
        live = every if int(budget.min()) > t else (budget > t).nonzero().squeeze(1)
        whole = live.shape[0] == n
        rl, s0 = (r, r0) if whole else (r[live], r0[live])
        idx_l = idx[:, : t + 1] if whole else idx[live, : t + 1]  # slot t is filled below
        val_l = val[:, : t + 1] if whole else val[live, : t + 1]
        old_idx, active = idx_l[:, :t], val_l[:, :t] != 0

        g = rl @ D.T  # [m, d_sae]: the only wide tensor
        g_old = g.gather(1, old_idx)  # [m, t] gradient at the previous slots
        score = g.mul_(inv_norm).add_(penalty)
        score.scatter_add_(1, old_idx, torch.zeros_like(g_old).masked_fill_(active, -math.inf))
        best, new = score.max(dim=1)
        del g, score
        valid = best > -math.inf
        g_new = torch.where(valid, (rl * D[new]).sum(dim=1), torch.zeros_like(best))

        idx_l = torch.cat([old_idx, new.unsqueeze(1)], dim=1)
        g_s = torch.cat([g_old.masked_fill_(~active, 0.0), g_new.unsqueeze(1)], dim=1)  # [m, t + 1]
        c = _combine(idx_l, D, g_s, d_in)
        coef = (val_l + _line_step(rl, c).unsqueeze(1) * g_s).clamp_min_(0.0)
        r_new = s0 - _combine(idx_l, D, coef, d_in)
        if whole:
            idx[:, t] = new
            val[:, : t + 1] = coef
            r = r_new
        else:
            idx[live, t] = new
            val[live, : t + 1] = coef
            r[live] = r_new
    return idx.masked_fill_(val == 0, 0), val


@torch.no_grad()
def gradient_pursuit(
    sae: SAE, x: Tensor, *, budget: Tensor | None = None, chunk_size: int | None = None
) -> SparseCodes:
    """Non-negative gradient-pursuit codes of ``x [..., d_in]`` over ``sae.W_dec`` as ``SparseCodes [..., m]``.

    ``budget [...]`` (integers) caps each token's iterations and so its L0; by default it is the token's L0
    under ``sae``'s encoder. ``m`` is the largest budget; values come back in the SAE's dtype. ``chunk_size``
    (tokens) bounds the one ``[chunk, d_sae]`` tensor alive per iteration.
    """
    x2d, lead = _flat(sae, x)
    budgets = None if budget is None else _budgets(sae, x2d, budget, lead)
    cd = compute_dtype(sae)
    D, inv_norm, penalty = _dictionary(sae, cd)
    parts = [(x2d.new_zeros((0, 0), dtype=torch.long), x2d.new_zeros((0, 0), dtype=cd))]
    for i, j in _spans(x2d.shape[0], chunk_size):
        xc = x2d[i:j]
        bc = _budgets(sae, xc, None, ()) if budgets is None else budgets[i:j]
        parts.append(_pursue_sparse(_target(sae, xc, sae.input_stats(xc), cd), bc, D, inv_norm, penalty))
    m = max(p[0].shape[1] for p in parts)
    indices = torch.cat([F.pad(p[0], (0, m - p[0].shape[1])) for p in parts])
    values = torch.cat([F.pad(p[1], (0, m - p[1].shape[1])) for p in parts]).to(sae.dtype)
    return SparseCodes(indices=indices.reshape(*lead, m), values=values.reshape(*lead, m))


@torch.no_grad()
def pursuit_reconstruct(
    sae: SAE, x: Tensor, *, budget: Tensor | None = None, chunk_size: int | None = None
) -> tuple[Tensor, SparseCodes]:
    """``(x_hat [..., d_in], codes)``: the pursuit codes decoded by the SAE (``b_dec``, scale, normalization)."""
    codes = gradient_pursuit(sae, x, budget=budget, chunk_size=chunk_size)
    return sae.decode_sparse(codes, stats=sae.input_stats(x)), codes


# ---------------------------------------------------------------------------------------------- dense


@torch.no_grad()
def pursuit_dense(sae: SAE, x: Tensor, *, budget: Tensor | None = None) -> Tensor:
    """Reference: the same pursuit with dense ``[n, d_sae]`` coefficients; returns codes ``[..., d_sae]``.

    Written to be obviously right, not fast: three ``[n, d_sae]`` matmuls per iteration.
    """
    x2d, lead = _flat(sae, x)
    budgets = _budgets(sae, x2d, budget, lead)
    cd = compute_dtype(sae)
    D, inv_norm, penalty = _dictionary(sae, cd)
    s = _target(sae, x2d, sae.input_stats(x2d), cd)  # [n, d_in]
    n = s.shape[0]
    w = s.new_zeros((n, sae.cfg.d_sae))
    rows = torch.arange(n, device=s.device)
    for t in range(int(budgets.max()) if n else 0):
        r = s - w @ D
        g = r @ D.T
        in_support = w != 0
        score = (g * inv_norm + penalty).masked_fill(in_support, -math.inf)
        best, new = score.max(dim=1)
        in_support[rows, new] |= best > -math.inf
        g_s = torch.where(in_support, g, torch.zeros_like(g))
        c = g_s @ D
        step = _line_step(r, c)
        w_next = (w + step.unsqueeze(1) * g_s).clamp_min(0.0)
        w = torch.where((budgets > t).unsqueeze(1), w_next, w)
    return w.reshape(*lead, sae.cfg.d_sae)


# ---------------------------------------------------------------------------------------------- wrapper


class PursuitSAE(SAE):
    """An SAE whose ``reconstruct`` (and ``forward``) runs gradient pursuit at the encoder's per-token L0.

    ``encode``/``encode_sparse`` stay the SAE's encoder (they set the budget). Drop-in for engines that call
    ``cfg``, ``dtype``, ``check_input_width`` and ``reconstruct``, e.g. ``decompose(store, {name: pursuit})``.
    """

    @classmethod
    def from_sae(cls, sae: SAE) -> PursuitSAE:
        """Wrap ``sae``'s tensors (shared, not copied) and config."""
        wrapped = cls.from_tensors(sae.cfg, dict(sae.named_tensors()), validate=False)
        assert isinstance(wrapped, PursuitSAE)
        return wrapped

    def reconstruct(self, x: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, SparseCodes]:
        """``(x_hat [..., d_in], codes)`` from gradient pursuit with the encoder's L0 per token."""
        return pursuit_reconstruct(self, x, chunk_size=chunk_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", reconstruct=gradient_pursuit"


__all__ = ["PursuitSAE", "compute_dtype", "gradient_pursuit", "pursuit_dense", "pursuit_reconstruct"]
