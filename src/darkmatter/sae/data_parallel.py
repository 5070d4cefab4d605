"""Data-parallel SAE training under torchrun: the same global batch on every rank, each rank's share of its
rows, and the sums (gradients, batch statistics) added across ranks before every rank's identical step."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F

from darkmatter.ranks import Ranks
from darkmatter.sae import jumprelu
from darkmatter.sae.member import Member

Tensor = torch.Tensor


class FamilyTrainer(Protocol):
    """What a data-parallel step needs of the trainer (``darkmatter.sae.train.FamilyTrainer``)."""

    ranks: Ranks
    device: torch.device
    cfg: Any

    def encode(self, m: Member, x: Tensor, batch_rows: int) -> tuple[Tensor, Tensor, Tensor]: ...

    def decode(self, m: Member, idx: Tensor, vals: Tensor) -> Tensor: ...

    def step_from_grads(
        self, m: Member, factor: float, loss: Tensor, aux: Tensor, total: Tensor, l0: float, n_dead: int
    ) -> dict[str, float]: ...


def shared_update(trainer: FamilyTrainer, m: Member, x_batch: Tensor, factor: float) -> dict[str, float]:
    """One Adam step of ``m`` for one rank of a data-parallel run: the loss and gradients of this rank's
    rows, the batch's sums (``FamilyTrainer._update`` of one process, up to float32 summation order)."""
    ranks, n = trainer.ranks, x_batch.shape[0]
    start, stop = ranks.bounds(n)
    x = x_batch[start:stop]
    var = (x_batch - x_batch.mean(0)).pow(2).sum()  # of the whole batch: every rank holds it
    penalty = torch.zeros((), device=trainer.device)
    if m.spec.kind == "jumprelu":
        recon, codes, penalty, pre = jumprelu.forward(m, x)
        penalty = penalty * (x.shape[0] / n)  # this rank's share of the batch mean
        fired, active = (codes > 0).any(0), (codes > 0).sum()
    else:
        idx, vals, pre = trainer.encode(m, x, n)
        recon = trainer.decode(m, idx, vals)
        with torch.no_grad():
            fired = torch.zeros(m.spec.d_sae, dtype=torch.bool, device=trainer.device)
            fired[idx[vals > 0]] = True
        active = (vals > 0).sum()
    err = x - recon
    loss = err.pow(2).sum() / var
    with torch.no_grad():
        hits = fired.to(torch.float64)
        sums = torch.cat([err.detach().double().sum(0), active.double().reshape(1)])
        ranks.sum_([hits, sums])
        m.since_fired += n
        m.since_fired[hits > 0] = 0
        dead = m.since_fired >= trainer.cfg.dead_tokens
    l0 = float(sums[-1]) / n
    n_dead = int(dead.sum())
    aux = torch.zeros((), device=trainer.device)
    if trainer.cfg.aux_k and trainer.cfg.aux_coef and n_dead:
        k_aux = min(trainer.cfg.aux_k, n_dead)
        a_vals, a_idx = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=1, sorted=False)
        a_rec = F.embedding_bag(a_idx, m.W_dec, per_sample_weights=a_vals.relu(), mode="sum")
        e = err.detach()
        spread = (e - (sums[:-1] / n).to(e.dtype)).pow(2).sum().double().reshape(1)
        ranks.sum_([spread])
        aux = (e - a_rec).pow(2).sum() / spread[0].to(e.dtype).clamp_min(1e-12)
        aux = torch.nan_to_num(aux, nan=0.0)
    total = loss + trainer.cfg.aux_coef * aux + m.sparsity_coef * penalty
    m.opt.zero_grad(set_to_none=True)
    total.backward()
    params = [p for p in (m.W_enc, m.b_enc, m.W_dec, m.b_dec, m.log_threshold) if p is not None]
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    ranks.sum_(grads)  # the batch's gradient: each rank's share summed
    shares = torch.stack([loss.detach(), aux.detach(), total.detach()]).double()
    ranks.sum_([shares])
    loss_all, aux_all, total_all = (shares[i] for i in range(3))
    return trainer.step_from_grads(m, factor, loss_all, aux_all, total_all, l0, n_dead)


def gathered(ranks: Ranks, values: Tensor) -> Tensor:
    """``values`` of every rank, in rank order (this rank's alone when training in one process)."""
    if not ranks.active:
        return values
    import torch.distributed as dist

    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(ranks.world)]
    dist.all_gather(sizes, torch.tensor([values.numel()]))
    longest = int(max(int(n) for n in sizes))
    padded = torch.full((longest,), float("-inf"), dtype=values.dtype, device=values.device)
    padded[: values.numel()] = values
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes, strict=True)])
