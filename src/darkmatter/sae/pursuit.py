"""Inference-time gradient pursuit over a frozen SAE decoder (Smith 2024; the paper's §6.1 experiment).

Per token, non-negative coefficients ``w`` are fitted so that ``w @ W_dec`` approximates ``r0 = x' - b_dec``,
where ``x'`` is the SAE's own encoder input before the ``b_dec`` shift (per-token ``normalize``, then
``* input_scale``). ``b_dec`` is subtracted whatever ``apply_b_dec_to_input`` says, because the decoder always
adds it back. A token's budget is its L0 under the SAE's encoder. For tokens with budget left, each iteration:

1. selects the atom outside the support with the largest ``<r, d_j> / ||d_j||`` (never a zero-norm atom);
2. takes the gradient on the support ``S`` (old support plus the new atom), ``g_j = <r, d_j>``;
3. line-searches exactly along it: ``c = sum_S g_j d_j``, ``step = <r, c> / ||c||^2`` (0 when ``c = 0``);
4. sets ``w_S += step * g_S``, clamps at 0 (clamped atoms leave the support), and recomputes ``r = r0 - w D``.

Differences from the original script (paper-experiments.md §8): selection skips atoms already in the support
and divides by the atom norm (the same as the script's signed argmax when decoder rows have unit norm); and
``c = 0`` gives step 0 rather than NaN. The support grows by at most one atom per iteration, so it never
exceeds the budget. ``input_scale`` cancels in selection, gradient and step, so the codes do not change under
``fold_input_scale()``. Every ``normalize`` mode is supported.

``gradient_pursuit`` keeps per-token ``(indices, values) [n, L]``. Its only ``[n, d_sae]`` tensor is one
iteration's score matrix. ``pursuit_dense`` is the plain dense reference used by the tests and by
``bench/bench_pursuit.py``. Both accumulate in float32 (float64 for float64 SAEs) on the SAE's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from darkmatter.errors import ConfigError, ShapeError
from darkmatter.sae.model import SAE, InputStats, SparseCodes

_DEFAULT_CHUNK = 1024  # tokens pursued together when the caller gives no chunk_size
_CANDIDATES = 8  # atoms per token that screened selection re-scores in full precision
# Bound on |bf16 score - exact score| / ||r|| for unit-norm atoms. Input rounding (2u) plus bf16 output
# rounding (u), with u = 2^-8, plus fp32 accumulation, through Cauchy-Schwarz, is about 3.1u. 8u leaves room
# for backends that reduce partial sums in bf16 (cuBLAS split-K).
_SCREEN_MARGIN = 2.0**-5


def _compute_dtype(sae: SAE) -> torch.dtype:
    """float32, or float64 for a float64 SAE. Half-precision SAEs are pursued in float32."""
    return torch.promote_types(sae.dtype, torch.float32)


def _flat(sae: SAE, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """``x [..., d_in]`` -> ``([n, d_in]`` on the SAE's device and dtype, lead shape ``[...])``."""
    d_in = sae.cfg.d_in
    if x.ndim == 0 or x.shape[-1] != d_in:
        raise ShapeError(f"Pursuit input must have last dimension d_in={d_in}, got shape {tuple(x.shape)}.")
    return x.reshape(-1, d_in).to(device=sae.device, dtype=sae.dtype), tuple(x.shape[:-1])


def _target(sae: SAE, x2d: Tensor, stats: InputStats | None, dtype: torch.dtype) -> Tensor:
    """``r0 = x' - b_dec [n, d_in]`` in ``dtype``; ``x'`` is transformed exactly as the encoder does it."""
    x = x2d.to(dtype)
    if stats is not None:
        x = (x - stats.shift.to(dtype)) / stats.scale.to(dtype)
    if sae.cfg.input_scale != 1.0:
        x = x * sae.cfg.input_scale
    return x - sae.b_dec.to(dtype)


def _given_budget(sae: SAE, budget: Tensor, lead: tuple[int, ...]) -> Tensor:
    """Check a caller's per-token budget ``[...]`` and flatten it to ``[n]`` int64."""
    if budget.is_floating_point() or budget.is_complex() or budget.dtype == torch.bool:
        raise ConfigError(f"budget must be an integer tensor of per-token L0s, got dtype {budget.dtype}.")
    if tuple(budget.shape) != lead:
        raise ShapeError(f"budget must have the input's token shape {lead}, got {tuple(budget.shape)}.")
    flat = budget.reshape(-1).to(device=sae.device, dtype=torch.long)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) > sae.cfg.d_sae):
        raise ConfigError(
            f"budget entries must lie in [0, d_sae={sae.cfg.d_sae}], "
            f"got values from {int(flat.min())} to {int(flat.max())}."
        )
    return flat


def _budgets(sae: SAE, x2d: Tensor, budget: Tensor | None, lead: tuple[int, ...]) -> Tensor:
    """Per-token budgets ``[n]`` int64: the caller's, or else the encoder's L0."""
    return sae.encode_sparse(x2d).l0() if budget is None else _given_budget(sae, budget, lead)


def _spans(n: int, chunk_size: int) -> list[tuple[int, int]]:
    if chunk_size <= 0:
        raise ConfigError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
    return [(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


@dataclass(frozen=True)
class _Atoms:
    """The dictionary in the compute dtype, and what selection needs from it."""

    D: Tensor  # [d_sae, d_in] decoder rows
    inv_norm: Tensor  # [d_sae] 1 / ||d_j||, 0 for zero-norm atoms
    penalty: Tensor | None  # [d_sae] -inf at zero-norm atoms, 0 elsewhere; None when there are none
    coarse: Tensor | None  # [d_sae, d_in] bf16 unit-norm rows for screened selection


def _atoms(sae: SAE, dtype: torch.dtype, screen: bool) -> _Atoms:
    D = sae.W_dec.detach().to(dtype).contiguous()
    norms = D.norm(dim=1)
    dead = norms == 0
    inv_norm = torch.where(dead, torch.zeros_like(norms), 1.0 / norms.clamp_min(torch.finfo(dtype).tiny))
    penalty = torch.zeros_like(norms).masked_fill_(dead, -math.inf) if bool(dead.any()) else None
    coarse = (D * inv_norm.unsqueeze(1)).to(torch.bfloat16) if screen else None
    return _Atoms(D=D, inv_norm=inv_norm, penalty=penalty, coarse=coarse)


def _line_step(r: Tensor, c: Tensor) -> Tensor:
    """Exact line-search step ``<r, c> / ||c||^2`` per row ``[n]``, 0 where ``c = 0``."""
    cc = torch.linalg.vecdot(c, c)
    return torch.where(cc > 0, torch.linalg.vecdot(r, c) / cc, 0.0)  # the 0/0 branch is discarded


# ---------------------------------------------------------------------------------------------- sparse


def _mask_support(score: Tensor, old_idx: Tensor, active: Tensor) -> None:
    """Set ``score [m, d_sae]`` to -inf, in place, at the atoms already in each token's support."""
    rows, slots = active.nonzero(as_tuple=True)
    score[rows, old_idx[rows, slots]] = -math.inf


def _select_exact(r: Tensor, atoms: _Atoms, old_idx: Tensor, active: Tensor) -> tuple[Tensor, Tensor]:
    """``(best score, atom) [m]``: the largest ``<r, d_j> / ||d_j||`` outside the support (full precision)."""
    score = (r @ atoms.D.T).mul_(atoms.inv_norm)  # [m, d_sae]
    if atoms.penalty is not None:
        score.add_(atoms.penalty)
    _mask_support(score, old_idx, active)
    best, new = score.max(dim=1)
    return best, new


def _select_screened(r: Tensor, atoms: _Atoms, old_idx: Tensor, active: Tensor) -> tuple[Tensor, Tensor, int]:
    """``_select_exact``'s choice at the cost of a bf16 matmul: ``(best, atom, number of fallback tokens)``.

    The top ``_CANDIDATES`` bf16 scores are re-scored in full precision. A token falls back to
    ``_select_exact`` unless the error bound proves that no atom outside its candidates can beat the winner.
    """
    assert atoms.coarse is not None
    approx = r.to(torch.bfloat16) @ atoms.coarse.T  # [m, d_sae]
    if atoms.penalty is not None:
        approx.add_(atoms.penalty.to(torch.bfloat16))
    _mask_support(approx, old_idx, active)
    top, cand = approx.topk(min(_CANDIDATES, approx.shape[1]), dim=1)  # [m, C]
    del approx
    exact = torch.bmm(F.embedding(cand, atoms.D), r.unsqueeze(2)).squeeze(2).mul_(atoms.inv_norm[cand])
    exact.masked_fill_(top == -math.inf, -math.inf)
    best, pick = exact.max(dim=1)
    new = cand.gather(1, pick.unsqueeze(1)).squeeze(1)
    floor = top[:, -1].to(r.dtype)  # no atom outside the candidates scores above floor + margin
    proven = (floor == -math.inf) | (best > floor + _SCREEN_MARGIN * r.norm(dim=1))
    redo = (~proven).nonzero().squeeze(1)
    if redo.numel():
        best[redo], new[redo] = _select_exact(r[redo], atoms, old_idx[redo], active[redo])
    return best, new, int(redo.numel())


def _pursue_sparse(r0: Tensor, budget: Tensor, atoms: _Atoms, screen: bool) -> tuple[Tensor, Tensor]:
    """Gradient pursuit of the targets ``r0 [n, d_in]``, giving ``(indices, values) [n, max budget]``.

    Tokens are sorted by budget, so the ones still iterating always form a prefix. ``rows [n, L, d_in]``
    holds the decoder rows gathered for each token's slots.
    """
    n, d_in = r0.shape
    order = torch.argsort(budget, descending=True, stable=True)
    budget = budget[order]
    steps = int(budget[0]) if n else 0
    live = (budget.unsqueeze(0) > torch.arange(steps, device=budget.device).unsqueeze(1)).sum(1).tolist()
    s = r0[order]
    r = s.clone()
    idx = torch.zeros((n, steps), dtype=torch.long, device=r0.device)
    val = r0.new_zeros((n, steps))  # 0 = slot not in the support
    rows = r0.new_empty((n, steps, d_in))
    for t, m in enumerate(live):
        rl, old_idx, active = r[:m], idx[:m, :t], val[:m, :t] != 0
        if screen:
            best, new, fallbacks = _select_screened(rl, atoms, old_idx, active)
            screen = 2 * fallbacks <= m  # too many fallbacks: screening no longer pays for itself
        else:
            best, new = _select_exact(rl, atoms, old_idx, active)
        idx[:m, t] = new
        rows[:m, t] = atoms.D[new]
        R = rows[:m, : t + 1]
        support = torch.cat([active, (best > -math.inf).unsqueeze(1)], dim=1)  # [m, t + 1]
        g = torch.bmm(R, rl.unsqueeze(2)).squeeze(2).masked_fill_(~support, 0.0)
        c = torch.bmm(g.unsqueeze(1), R).squeeze(1)
        coef = (val[:m, : t + 1] + _line_step(rl, c).unsqueeze(1) * g).clamp_min_(0.0)
        val[:m, : t + 1] = coef
        r[:m] = s[:m] - torch.bmm(coef.unsqueeze(1), R).squeeze(1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    val = val[inverse]
    return idx[inverse].masked_fill_(val == 0, 0), val


@torch.no_grad()
def gradient_pursuit(
    sae: SAE,
    x: Tensor,
    *,
    budget: Tensor | None = None,
    chunk_size: int | None = None,
    screen: bool = True,
) -> SparseCodes:
    """Non-negative gradient-pursuit codes of ``x [..., d_in]`` over ``sae.W_dec``: ``SparseCodes [..., m]``.

    ``budget [...]`` (integers) caps each token's iterations, and with them its L0. It defaults to the
    token's L0 under ``sae``'s encoder. ``m`` is the largest budget. Values come back in the SAE's dtype.
    Tokens are pursued in chunks of ``chunk_size`` (default 1024). Per chunk, the largest tensors are one
    ``[chunk, d_sae]`` score matrix per iteration and the gathered decoder rows ``[chunk, m, d_in]``.

    With ``screen``, the atom is chosen from a bf16 matmul and checked in full precision. The choice is the
    same as with ``screen=False``, which runs the full-precision matmul. Screening is faster wherever bf16
    matmuls are: CUDA, and CPUs with AVX512-BF16 or AMX.
    """
    x2d, lead = _flat(sae, x)
    budgets = None if budget is None else _given_budget(sae, budget, lead)
    cd = _compute_dtype(sae)
    atoms = _atoms(sae, cd, screen)
    parts = [(x2d.new_zeros((0, 0), dtype=torch.long), x2d.new_zeros((0, 0), dtype=cd))]
    for i, j in _spans(x2d.shape[0], _DEFAULT_CHUNK if chunk_size is None else chunk_size):
        xc = x2d[i:j]
        bc = sae.encode_sparse(xc).l0() if budgets is None else budgets[i:j]
        parts.append(_pursue_sparse(_target(sae, xc, sae.input_stats(xc), cd), bc, atoms, screen))
    m = max(p[0].shape[1] for p in parts)
    indices = torch.cat([F.pad(p[0], (0, m - p[0].shape[1])) for p in parts])
    values = torch.cat([F.pad(p[1], (0, m - p[1].shape[1])) for p in parts]).to(sae.dtype)
    return SparseCodes(indices=indices.reshape(*lead, m), values=values.reshape(*lead, m))


@torch.no_grad()
def pursuit_reconstruct(
    sae: SAE,
    x: Tensor,
    *,
    budget: Tensor | None = None,
    chunk_size: int | None = None,
    screen: bool = True,
) -> tuple[Tensor, SparseCodes]:
    """``(x_hat [..., d_in], codes)``: pursuit codes decoded by the SAE (``b_dec``, scale, normalization)."""
    codes = gradient_pursuit(sae, x, budget=budget, chunk_size=chunk_size, screen=screen)
    return sae.decode_sparse(codes, stats=sae.input_stats(x)), codes


# ---------------------------------------------------------------------------------------------- dense


@torch.no_grad()
def pursuit_dense(sae: SAE, x: Tensor, *, budget: Tensor | None = None) -> Tensor:
    """Reference: the same pursuit with dense ``[n, d_sae]`` coefficients. Returns codes ``[..., d_sae]``.

    Written to be obviously right, not fast: three ``[n, d_in] x [d_in, d_sae]`` matmuls per iteration.
    """
    x2d, lead = _flat(sae, x)
    budgets = _budgets(sae, x2d, budget, lead)
    atoms = _atoms(sae, _compute_dtype(sae), screen=False)
    D = atoms.D
    penalty = atoms.penalty if atoms.penalty is not None else torch.zeros_like(atoms.inv_norm)
    s = _target(sae, x2d, sae.input_stats(x2d), D.dtype)  # [n, d_in]
    n = s.shape[0]
    w = s.new_zeros((n, sae.cfg.d_sae))
    rows = torch.arange(n, device=s.device)
    for t in range(int(budgets.max()) if n else 0):
        r = s - w @ D
        g = r @ D.T
        in_support = w != 0
        score = (g * atoms.inv_norm + penalty).masked_fill(in_support, -math.inf)
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

    ``encode`` and ``encode_sparse`` remain the SAE's encoder, which sets the budget. It is a drop-in for
    engines that use ``cfg``, ``dtype``, ``check_input_width`` and ``reconstruct``, such as
    ``decompose(store, {name: PursuitSAE.from_sae(sae)})``.
    """

    @classmethod
    def from_sae(cls, sae: SAE) -> PursuitSAE:
        """Wrap ``sae``'s config and tensors. The tensors are shared, not copied."""
        wrapped = cls.from_tensors(sae.cfg, dict(sae.named_tensors()), validate=False)
        assert isinstance(wrapped, PursuitSAE)
        return wrapped

    def reconstruct(self, x: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, SparseCodes]:
        """``(x_hat [..., d_in], codes)`` from gradient pursuit at each token's encoder L0."""
        return pursuit_reconstruct(self, x, chunk_size=chunk_size)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", reconstruct=gradient_pursuit"
