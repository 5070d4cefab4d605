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

``gradient_pursuit`` keeps per-token ``(indices, values) [n, L]``. Its only ``[n, d_sae]`` tensor is a chunk's
score matrix, reused by every iteration. An iteration is one ``[n, d_in] x [d_in, d_sae]`` matmul (bf16 when
screening), one pass over its result for block maxima, which locate the best atoms, and work that grows with
the support, not with d_sae. ``pursuit_dense`` is the plain dense reference used by the tests and by
``bench/bench_pursuit.py``. Both accumulate in float32 (float64 for float64 SAEs) on the SAE's device.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
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
_PAIRS_PER_TOKEN = 256  # atoms an unproven token re-scores one by one before a full-precision matmul instead
_WORKER_TOKENS = 128  # a chunk's tokens per CPU worker thread; far fewer make the worker's matmul inefficient
# Workers set their own thread count, which only the OpenMP backend allows once parallel work has started.
_OPENMP = "parallel backend: OpenMP" in torch.__config__.parallel_info()


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
    """The dictionary in the compute dtype, and what selection needs from it.

    Score matrices are ``[m, width]``, ``width = blocks * block >= d_sae + 1``. Columns past ``d_sae`` hold
    -inf, so every row has a spare column to send empty slots to; row maxima are found through block maxima.
    """

    D: Tensor  # [d_sae, d_in] decoder rows
    inv_norm: Tensor  # [d_sae] 1 / ||d_j||, 0 for zero-norm atoms
    penalty: Tensor | None  # [width] -inf at zero-norm atoms and padding, else 0; None: no zero-norm atom
    coarse: Tensor | None  # [d_sae, d_in] bf16 unit-norm rows for screened selection
    block: int  # columns per block of a score matrix
    width: int  # columns of a score matrix


def _atoms(sae: SAE, dtype: torch.dtype, screen: bool) -> _Atoms:
    D = sae.W_dec.detach().to(dtype).contiguous()
    d_sae = D.shape[0]
    norms = D.norm(dim=1)
    dead = norms == 0
    inv_norm = torch.where(dead, torch.zeros_like(norms), 1.0 / norms.clamp_min(torch.finfo(dtype).tiny))
    block = min(256, 32 * max(1, round(math.sqrt(d_sae) / 16)))  # ~2 sqrt(d_sae): both stages stay small
    width = block * math.ceil((d_sae + 1) / block)
    penalty = None
    if bool(dead.any()):
        penalty = norms.new_full((width,), -math.inf)
        penalty[:d_sae].masked_fill_(~dead, 0.0)
    coarse = (D * inv_norm.unsqueeze(1)).to(torch.bfloat16) if screen else None
    return _Atoms(D=D, inv_norm=inv_norm, penalty=penalty, coarse=coarse, block=block, width=width)


def _score_buffer(atoms: _Atoms, rows: int, dtype: torch.dtype) -> Tensor:
    """An ``[rows, width]`` score matrix whose padding columns hold -inf; selection overwrites the rest."""
    score = atoms.D.new_empty((rows, atoms.width), dtype=dtype)
    score[:, atoms.D.shape[0] :] = -math.inf
    return score


def _line_step(r: Tensor, c: Tensor) -> Tensor:
    """Exact line-search step ``<r, c> / ||c||^2`` per row ``[n]``, 0 where ``c = 0``."""
    cc = torch.linalg.vecdot(c, c)
    return torch.where(cc > 0, torch.linalg.vecdot(r, c) / cc, 0.0)  # the 0/0 branch is discarded


# ---------------------------------------------------------------------------------------------- sparse


def _exclude(score: Tensor, excluded: Tensor) -> None:
    """Set ``score [m, width]`` to -inf at the columns ``excluded [m, t]``, in place."""
    if excluded.numel():
        rows = torch.arange(score.shape[0], device=score.device).unsqueeze(1) * score.shape[1]
        score.view(-1).index_fill_(0, (excluded + rows).flatten(), -math.inf)  # scatter_ is slow in bf16


def _block_argmax(score: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """``(row maximum, first column holding it) [m]`` of ``score [m, width]``, found through block maxima."""
    m, width = score.shape
    nb = width // block
    blk = score.view(m, nb, block).amax(dim=2).argmax(dim=1)  # the first block holding the row maximum
    within = score.view(m * nb, block).index_select(0, torch.arange(m, device=score.device) * nb + blk)
    col = within.argmax(dim=1, keepdim=True)
    return within.gather(1, col).squeeze(1), blk * block + col.squeeze(1)


def _select_exact(r: Tensor, atoms: _Atoms, excluded: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
    """``(best score, atom) [m]``: the largest ``<r, d_j> / ||d_j||`` over atoms not in ``excluded [m, t]``.

    Full precision; ties go to the lowest atom, as in ``pursuit_dense``. ``score [m, width]`` is a buffer from
    ``_score_buffer`` in ``r``'s dtype. A selected padding column (atom >= d_sae) comes with best = -inf.
    """
    d_sae = atoms.D.shape[0]
    real = score[:, :d_sae]
    torch.mm(r, atoms.D.T, out=real)
    real.mul_(atoms.inv_norm)
    if atoms.penalty is not None:
        real.add_(atoms.penalty[:d_sae])
    _exclude(score, excluded)
    return _block_argmax(score, atoms.block)


def _select_screened(
    r: Tensor, atoms: _Atoms, excluded: Tensor, approx: Tensor
) -> tuple[Tensor, Tensor, int, int]:
    """``_select_exact``'s choice from a bf16 matmul: ``(best, atom, unproven tokens, full-matmul tokens)``.

    The ``_CANDIDATES`` best bf16 scores, found inside the blocks with the largest maxima, are re-scored in
    full precision. The winner is proven when no other atom's bf16 score plus the error bound reaches it.
    Otherwise every atom within the bound is re-scored, or, past ``_PAIRS_PER_TOKEN`` such atoms, the token
    goes through ``_select_exact``. ``approx [m, width]`` is a bf16 buffer from ``_score_buffer``.
    """
    assert atoms.coarse is not None
    m, block, D = r.shape[0], atoms.block, atoms.D
    d_sae, nb = D.shape[0], atoms.width // block
    torch.mm(r.to(torch.bfloat16), atoms.coarse.T, out=approx[:, :d_sae])
    _exclude(approx, excluded)
    k, chosen = _CANDIDATES, min(_CANDIDATES, nb)  # the k best atoms lie in the `chosen` best blocks
    bmax, blk = approx.view(m, nb, block).amax(dim=2).topk(min(k + 1, nb), dim=1)
    blk = blk[:, :chosen]
    rows = (torch.arange(m, device=r.device).unsqueeze(1) * nb + blk).flatten()
    vals = approx.view(m * nb, block).index_select(0, rows).view(m, chosen * block)
    if atoms.penalty is not None:
        vals = vals + atoms.penalty.view(nb, block).index_select(0, blk.flatten()).view(m, chosen * block)
    top, at = vals.topk(min(k + 1, chosen * block), dim=1)
    # Bound on the bf16 score of every other atom: the next one in the chosen blocks, and the next block
    # maximum for the rest.
    floor = top[:, k].to(r.dtype) if top.shape[1] > k else r.new_full((m,), -math.inf)
    if nb > chosen:
        floor = torch.maximum(floor, bmax[:, chosen].to(r.dtype))
    top, at = top[:, :k], at[:, :k]
    cand, order = (blk.gather(1, at // block) * block + at % block).sort(dim=1)  # ties go to the lowest atom
    top, safe = top.gather(1, order), cand.clamp_max(d_sae - 1)
    exact = torch.bmm(r.unsqueeze(1), F.embedding(safe, D).mT).squeeze(1).mul_(atoms.inv_norm[safe])
    exact.masked_fill_(top == -math.inf, -math.inf)
    pick = exact.argmax(dim=1, keepdim=True)
    best, new = exact.gather(1, pick).squeeze(1), cand.gather(1, pick).squeeze(1)
    margin = _SCREEN_MARGIN * r.norm(dim=1)
    unproven = ((floor > -math.inf) & (best <= floor + margin)).nonzero().squeeze(1)
    if not unproven.numel():
        return best, new, 0, 0
    return best, new, int(unproven.numel()), _settle(r, atoms, excluded, approx, unproven, best, new, margin)


def _settle(
    r: Tensor, atoms: _Atoms, excluded: Tensor, approx: Tensor, rows: Tensor, best: Tensor, new: Tensor,
    margin: Tensor,
) -> int:  # fmt: skip
    """Finish screened selection for the unproven tokens ``rows``, in place; returns the full-matmul count.

    An atom that beats ``best`` has a bf16 score above ``best - margin``. Those atoms are re-scored in full
    precision; a token with more than ``_PAIRS_PER_TOKEN`` of them goes through ``_select_exact``.
    """
    D = atoms.D
    within = approx.index_select(0, rows) > (best[rows] - margin[rows]).unsqueeze(1)  # [f, width]
    many = within.sum(dim=1) > _PAIRS_PER_TOKEN
    heavy = rows[many]
    if heavy.numel():
        score = _score_buffer(atoms, heavy.numel(), r.dtype)
        best[heavy], new[heavy] = _select_exact(r[heavy], atoms, excluded[heavy], score)
        within[many] = False
    i, j = within.nonzero(as_tuple=True)  # (unproven token, atom) pairs; padding columns hold -inf
    exact = torch.linalg.vecdot(D[j], r[rows[i]]) * atoms.inv_norm[j]
    if atoms.penalty is not None:
        exact += atoms.penalty[j]
    f = rows.numel()
    top = exact.new_full((f,), -math.inf).scatter_reduce_(0, i, exact, "amax", include_self=True)
    win = exact == top[i]
    first = j.new_full((f,), atoms.width - 1).scatter_reduce_(0, i[win], j[win], "amin", include_self=True)
    light = rows[~many]
    best[light], new[light] = top[~many], first[~many]
    return int(heavy.numel())


@torch.no_grad()  # also in worker threads, where grad mode is the thread's own
def _pursue_sparse(r0: Tensor, budget: Tensor, atoms: _Atoms, screen: bool) -> tuple[Tensor, Tensor]:
    """Gradient pursuit of the targets ``r0 [n, d_in]``, giving ``(indices, values) [n, max budget]``.

    Tokens are sorted by budget, so the ones still iterating always form a prefix. ``rows [n, L, d_in]``
    holds the decoder rows gathered for each token's slots, ``score [n, width]`` the selection scores (bf16
    when screening). A slot whose value is 0 is not in the support.
    """
    n, d_in = r0.shape
    score = _score_buffer(atoms, n, torch.bfloat16 if screen else r0.dtype)
    d_sae, spare = atoms.D.shape[0], atoms.width - 1
    order = torch.argsort(budget, descending=True, stable=True)
    budget = budget[order]
    steps = int(budget[0]) if n else 0
    live = (budget.unsqueeze(0) > torch.arange(steps, device=budget.device).unsqueeze(1)).sum(1).tolist()
    s = r0[order]
    r = s.clone()
    idx = torch.zeros((n, steps), dtype=torch.long, device=r0.device)
    val = r0.new_zeros((n, steps))
    rows = r0.new_empty((n, steps, d_in))
    for t, m in enumerate(live):
        rl, empty = r[:m], val[:m, :t] == 0
        excluded = idx[:m, :t].masked_fill(empty, spare)  # the support; empty slots point at a padding column
        if screen:
            best, new, _, full = _select_screened(rl, atoms, excluded, score[:m])
            if 2 * full > m:  # bf16 cannot decide for most tokens: the full-precision matmul is cheaper
                screen, score = False, _score_buffer(atoms, m, r0.dtype)
        else:
            best, new = _select_exact(rl, atoms, excluded, score[:m])
        new.clamp_max_(d_sae - 1)  # a padding column comes with best = -inf: the slot stays empty
        idx[:m, t] = new
        rows[:m, t] = atoms.D.index_select(0, new)
        R = rows[:m, : t + 1]
        g = torch.bmm(rl.unsqueeze(1), R.mT).squeeze(1)  # [m, t + 1] gradient on the support
        g[:, :t].masked_fill_(empty, 0.0)
        g[:, t].masked_fill_(best == -math.inf, 0.0)
        c = torch.bmm(g.unsqueeze(1), R).squeeze(1)
        coef = (val[:m, : t + 1] + _line_step(rl, c).unsqueeze(1) * g).clamp_min_(0.0)
        val[:m, : t + 1] = coef
        r[:m] = torch.baddbmm(s[:m].unsqueeze(1), coef.unsqueeze(1), R, alpha=-1.0).squeeze(1)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    val = val[inverse]
    return idx[inverse].masked_fill_(val == 0, 0), val


def _pursue_chunk(r0: Tensor, budget: Tensor, atoms: _Atoms, screen: bool) -> tuple[Tensor, Tensor]:
    """``_pursue_sparse`` of one chunk; on CPU, its tokens are dealt to up to one worker per torch thread.

    Each worker runs its share with ``threads // workers`` intra-op threads. An iteration is a few dozen short
    kernels, and intra-op threads meet at a barrier after each: on a machine shared with other processes, a
    descheduled thread stalls every barrier, which can make two threads slower than one. Workers never wait
    for each other.
    """
    n, threads = r0.shape[0], torch.get_num_threads()
    workers = min(threads, -(-n // _WORKER_TOKENS)) if r0.device.type == "cpu" and _OPENMP else 1
    if workers <= 1:
        return _pursue_sparse(r0, budget, atoms, screen)
    deal = torch.argsort(budget, descending=True, stable=True)  # dealt in turn: similar budgets per worker
    shares = [deal[k::workers] for k in range(workers)]
    per_worker = threads // workers
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(per_worker,)) as pool:
            done = list(pool.map(lambda rows: _pursue_sparse(r0[rows], budget[rows], atoms, screen), shares))
    finally:
        torch.set_num_threads(threads)  # the workers changed the process-wide default too
    width = max(part[0].shape[1] for part in done)
    idx = r0.new_zeros((n, width), dtype=torch.long)
    val = r0.new_zeros((n, width))
    for rows, (i, v) in zip(shares, done, strict=True):
        idx[rows, : i.shape[1]], val[rows, : v.shape[1]] = i, v
    return idx, val


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
    Tokens are pursued in chunks of ``chunk_size`` (default 1024). Per chunk, the largest tensors are a
    ``[chunk, d_sae]`` score matrix (bf16 when screening) and the gathered decoder rows ``[chunk, m, d_in]``.
    On CPU, a chunk's tokens are shared among worker threads, one per started ``_WORKER_TOKENS`` tokens and at
    most one per torch thread (see ``_pursue_chunk``). The results do not depend on the split.

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
        parts.append(_pursue_chunk(_target(sae, xc, sae.input_stats(xc), cd), bc, atoms, screen))
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
    penalty = torch.zeros_like(atoms.inv_norm) if atoms.penalty is None else atoms.penalty[: D.shape[0]]
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
