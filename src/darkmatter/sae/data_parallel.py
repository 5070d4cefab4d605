"""One training step of an SAE, exact under data parallelism: N ranks take the step one process takes.

Every batch is cut into ``TrainConfig.grad_blocks`` contiguous row blocks, whatever the number of ranks
(``row_blocks``); one process works through all of them, a rank of a ``torchrun`` run through its
contiguous share of whole blocks (possibly none). Each block's float32 forward and backward is then the same
computation in both cases, so its numbers are bit-identical. What joins the blocks:

- batch statistics (each block's error sum, active count, AuxK spread and loss terms): one float64 row per
  block, zero on the ranks that do not own the block, summed across ranks (adding zeros is exact) and then
  over the blocks in block order: bit-identical to one process. Latents that fired: exact counts.
- BatchTopK's batch threshold: the k·n-th largest of all blocks' candidates, gathered in rank order.
- gradients: each block's float32 gradient added into a float64 accumulator, accumulators summed across
  ranks, cast to float32. Only the association of float64 additions of the same float32 terms differs
  from one process, and it does not matter where those additions are exact: a float64 sum of B float32
  numbers is exact unless their magnitudes span more than 2^(29 − log2 B) (2^26 for 8 blocks). Otherwise
  two sums differ by a float64 rounding (~1e-16 relative), which changes the float32 cast only when the
  sum lies that close to a float32 rounding boundary (a chance of about 2^-29 per such element).
  The encoder bias ``b_enc − b_dec·W_enc`` is formed once per step, its gradient summed like a parameter's
  and taken through it once, after the sums: the same float32 numbers on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from darkmatter.ranks import Ranks
from darkmatter.sae import jumprelu
from darkmatter.sae.member import Member

Tensor = torch.Tensor
F64 = torch.float64


class FamilyTrainer(Protocol):
    """What a step needs of the trainer (``darkmatter.sae.train.FamilyTrainer``)."""

    ranks: Ranks
    device: torch.device
    cfg: Any

    def encode_blocks(
        self, m: Member, xs: Sequence[Tensor], batch_rows: int, bias: Tensor | None = None
    ) -> list[tuple[Tensor, Tensor, Tensor]]: ...

    def decode(self, m: Member, idx: Tensor, vals: Tensor) -> Tensor: ...

    def step_from_grads(
        self, m: Member, factor: float, loss: Tensor, aux: Tensor, total: Tensor, l0: float, n_dead: int
    ) -> dict[str, float]: ...


def row_blocks(rows: int, blocks: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the contiguous blocks of a batch of ``rows``: ``ceil(rows / blocks)`` rows each
    (the last shorter, and fewer blocks when rows are few); the same for any number of ranks."""
    size = max(1, -(-rows // blocks))
    return [(s, min(s + size, rows)) for s in range(0, rows, size)]


def exact_update(trainer: FamilyTrainer, m: Member, x_batch: Tensor, factor: float) -> dict[str, float]:
    """One Adam step of ``m`` on the scaled batch ``x_batch`` (every rank holds all of it); the batch's
    statistics. With ``SINGLE`` ranks this is the one-process step, and N ranks take the same step."""
    ranks, cfg, n = trainer.ranks, trainer.cfg, x_batch.shape[0]
    blocks = row_blocks(n, cfg.grad_blocks)
    first, stop = ranks.bounds(len(blocks))
    xs = [x_batch[a:b] for a, b in blocks[first:stop]]
    var = (x_batch - x_batch.mean(0)).pow(2).sum()  # of the whole batch
    # The encoder bias is formed once: the blocks' graphs start at a leaf copy of it, whose gradient is
    # summed like the parameters' and then taken through the bias once (not a [d, w] product per block).
    bias = m.encoder_bias()
    bias_leaf = bias.detach().requires_grad_()

    # phase 1: every block's forward, its graph kept; the batch's statistics from all blocks
    recons, pres, penalties, codes_of = _forward_blocks(trainer, m, xs, n, bias_leaf)
    errs = [x - r for x, r in zip(xs, recons, strict=True)]
    d = x_batch.shape[1]
    with torch.no_grad():
        hits = torch.zeros(m.spec.d_sae, dtype=F64, device=trainer.device)
        per_block = torch.zeros(len(blocks), d + 1, dtype=F64, device=trainer.device)
        for j, (err, (fired, active)) in enumerate(zip(errs, codes_of, strict=True)):
            hits += fired
            per_block[first + j, :d] = err.detach().double().sum(0)
            per_block[first + j, d] = active.double()
        ranks.sum_([hits, per_block])
        totals = in_block_order(per_block)
        m.since_fired += n
        m.since_fired[hits > 0] = 0
        dead = m.since_fired >= cfg.dead_tokens
    l0 = float(totals[d]) / n
    n_dead = int(dead.sum())
    use_aux = bool(cfg.aux_k and cfg.aux_coef and n_dead)
    spread = torch.ones((), device=trainer.device)
    if use_aux:  # the AuxK loss's denominator: the error's spread around its batch mean
        mean = (totals[:d] / n).to(x_batch.dtype)
        spreads = torch.zeros(len(blocks), dtype=F64, device=trainer.device)
        for j, err in enumerate(errs):
            spreads[first + j] = (err.detach() - mean).pow(2).sum().double()
        ranks.sum_([spreads])
        spread = in_block_order(spreads).to(x_batch.dtype).clamp_min(1e-12)

    # phase 2: each block's share of the loss, its gradient added in float64
    params = [*m.params(), bias_leaf]
    sums = [torch.zeros(p.shape, dtype=F64, device=p.device) for p in params]
    terms = torch.zeros(len(blocks), 3, dtype=F64, device=trainer.device)  # loss, aux, total
    m.opt.zero_grad(set_to_none=True)
    for j, (err, pre) in enumerate(zip(errs, pres, strict=True)):
        loss = err.pow(2).sum() / var
        aux = torch.zeros((), device=trainer.device)
        if use_aux:
            k_aux = min(cfg.aux_k, n_dead)
            a_vals, a_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1, sorted=False)
            a_rec = F.embedding_bag(a_idx, m.W_dec, per_sample_weights=a_vals.relu(), mode="sum")
            aux = torch.nan_to_num((err.detach() - a_rec).pow(2).sum() / spread, nan=0.0)
        total = loss + cfg.aux_coef * aux
        if penalties:
            total = total + m.sparsity_coef * (penalties[j] / n)  # the block's share of the batch mean
        total.backward()
        with torch.no_grad():
            for p, acc in zip(params, sums, strict=True):
                if p.grad is not None:
                    acc += p.grad
                p.grad = None
            terms[first + j] = torch.stack([loss.detach(), aux.detach(), total.detach()]).double()
    for t in (terms, *sums):  # one at a time: no second copy of all the accumulators at once
        ranks.sum_([t])
    for p, acc in zip(params, sums, strict=True):
        p.grad = acc.to(p.dtype)
    bias.backward(bias_leaf.grad)  # into b_enc, b_dec and W_enc: the same float32 numbers on every rank
    loss_all, aux_all, total_all = in_block_order(terms).unbind()
    return trainer.step_from_grads(m, factor, loss_all, aux_all, total_all, l0, n_dead)


def _forward_blocks(
    trainer: FamilyTrainer, m: Member, xs: list[Tensor], n: int, bias_leaf: Tensor
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[tuple[Tensor, Tensor]]]:
    """Each block's reconstruction, pre-activations, sparsity penalty (JumpReLU only) and codes' summary
    (latents that fired ``[d_sae]``, active count), every graph kept for the backward pass."""
    if m.spec.kind == "jumprelu":
        outs = [jumprelu.forward(m, x, bias_leaf) for x in xs]
        codes = [((o[1] > 0).any(0), (o[1] > 0).sum()) for o in outs]
        return [o[0] for o in outs], [o[3] for o in outs], [o[2] for o in outs], codes
    encoded = trainer.encode_blocks(m, xs, n, bias_leaf)
    recons = [trainer.decode(m, idx, vals) for idx, vals, _ in encoded]
    codes_of: list[tuple[Tensor, Tensor]] = []
    for idx, vals, _ in encoded:
        fired = torch.zeros(m.spec.d_sae, dtype=torch.bool, device=trainer.device)
        fired[idx[vals > 0]] = True
        codes_of.append((fired, (vals > 0).sum()))
    return recons, [pre for _, _, pre in encoded], [], codes_of


def in_block_order(rows: Tensor) -> Tensor:
    """The sum of ``rows [blocks, ...]`` added one block after the other (a fixed order, whatever the
    number of threads or ranks)."""
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total


def gathered(ranks: Ranks, values: Tensor) -> Tensor:
    """``values`` of every rank, in rank order (this rank's alone when training in one process)."""
    if not ranks.active:
        return values
    import torch.distributed as dist

    device = ranks.collective_device
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(ranks.world)]
    dist.all_gather(sizes, torch.tensor([values.numel()], device=device))
    longest = int(max(int(s) for s in sizes))
    padded = torch.full((longest,), float("-inf"), dtype=values.dtype, device=device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)]).to(values.device)
