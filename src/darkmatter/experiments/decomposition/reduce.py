"""Under ``torchrun`` each rank runs the engine's passes over its share of the shards; these sum the
partial accumulators across ranks, so every rank fits and evaluates on the sums of the whole store."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from darkmatter.ranks import Ranks

if TYPE_CHECKING:
    from darkmatter.experiments.decomposition.component_norms import ComponentNorms
    from darkmatter.experiments.decomposition.error_moments import ErrorMoments


def reduce_error_moments(sums: ErrorMoments, ranks: Ranks) -> None:
    """Pass 1: moments of every block, held-out metrics, per-context sums and token counts."""
    if not ranks.active:
        return
    for blocks in sums.moments.values():
        for moments in blocks:
            moments.all_reduce_()
    for held in sums.held_out.values():
        sse, nmse, ratio, n = ranks.sum_floats([held.sse, held.nmse_sum, held.ratio_sum, held.n])
        held.sse, held.nmse_sum, held.ratio_sum, held.n = sse, nmse, ratio, round(n)
        held.l0.all_reduce_()
    for acc in sums.contexts.values():
        ranks.sum_([acc.n, acc.sum_x, acc.sum_sq_x, *acc.sse.values()])
    n_train, n_test = ranks.sum_floats([sums.n_train, sums.n_test])
    sums.n_train, sums.n_test = round(n_train), round(n_test)


def reduce_component_norms(norms: ComponentNorms, ranks: Ranks) -> None:
    """Pass 2: norm moments of every block, cosines, nonlinear SSEs and mean norms (per SAE and per
    context); the per-context sums of pass 1 were reduced already and are left alone."""
    if not ranks.active:
        return
    for blocks in norms.moments.values():
        for moments in blocks:
            moments.all_reduce_()
    for cosine in norms.cosine.values():
        cosine.all_reduce_()
    names = list(norms.sse_nonlinear)
    totals = ranks.sum_floats([norms.sse_nonlinear[n] for n in names])
    norms.sse_nonlinear = dict(zip(names, totals, strict=True))
    ranks.sum_(torch.from_numpy(norms.norm_sums[n]) for n in names)  # in place, through the shared memory
    ranks.sum_(t for acc in norms.contexts.values() for t in acc.sse_nonlinear.values())
