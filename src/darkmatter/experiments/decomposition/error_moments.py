"""Pass 1: float64 moments of x against each SAE's error e = x − Sae(x), its norm and squared norm, per
site and split, with held-out reconstruction metrics and per-context sums for the bootstraps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from darkmatter.errors import DataError
from darkmatter.experiments.decomposition.accumulators import (
    ContextAccumulator,
    HeldOut,
    SplitBuffer,
    check_finite,
    merged,
    row_norms,
)
from darkmatter.experiments.decomposition.plan import RECONSTRUCT_CHUNK, EnginePlan
from darkmatter.ranks import Ranks
from darkmatter.stats import Moments

Tensor = torch.Tensor


@dataclass
class ErrorMoments:
    """Pass 1's sums: moments per (site, split) in blocks of contexts, held-out metrics per SAE, per-context
    sums per site."""

    moments: dict[tuple[str, str], list[Moments]]  # (site, part) -> one accumulator per block
    held_out: dict[str, HeldOut]
    contexts: dict[str, ContextAccumulator]
    n_train: int = 0
    n_test: int = 0

    def total(self, site: str, part: str, *, without: int | None = None) -> Moments:
        """The moments of ``site``'s ``part`` over every block (or every block but ``without``)."""
        return merged(self.moments[(site, part)], without)


def accumulate_error_moments(plan: EnginePlan) -> ErrorMoments:
    """One pass over the store. Rows of each batch are ordered train-first, so every split is a view, and
    each site's x, errors and norms go into one float64 buffer that feeds both splits' moments: one GEMM
    per chunk and split for the Gram and every SAE's cross products."""
    moments: dict[tuple[str, str], list[Moments]] = {}
    for site, names in plan.groups.items():
        d = plan.width[site]
        targets: dict[str, int] = {}
        for n in names:
            targets.update({f"{n}:e": d, f"{n}:e2": 1, f"{n}:en": 1})
        for part in ("train", "test"):
            moments[(site, part)] = [Moments(d, targets) for _ in range(plan.blocks(site))]
    sums = ErrorMoments(
        moments,
        {n: HeldOut(sae.cfg.d_sae) for n, sae in plan.saes.items()},
        {
            site: ContextAccumulator(plan.store.n_contexts, plan.width[site], names)
            for site, names in plan.groups.items()
        },
    )
    storage = plan.packed_storage({key: blocks[0] for key, blocks in moments.items()})
    for batch in plan.batches():
        order, n_train = plan.split.train_first(batch.context, batch.position)
        sums.n_train += n_train
        sums.n_test += len(order) - n_train
        ctx_test = batch.context[order[n_train:]].cpu()
        for site in plan.groups:
            x_tok_d = batch.acts[site][order]
            check_finite(x_tok_d, site)
            buf = storage[site][: len(x_tok_d)]
            b = plan.block_of(site, int(batch.context[0]))
            packed = SplitBuffer(moments[(site, "train")][b], moments[(site, "test")][b], n_train, buf)
            _add_site(plan, sums, site, x_tok_d, n_train, ctx_test, packed)
            packed.commit()
        plan.batch_done(len(order))
    reduce_error_moments(sums, plan.ranks)
    biggest = max(plan.width.values())
    if sums.n_train <= biggest + 1 or sums.n_test < 2:
        raise DataError(
            f"The split has {sums.n_train} train and {sums.n_test} test tokens; the regressions need more "
            f"than {biggest + 1} train and at least 2 test tokens. Harvest more contexts."
        )
    return sums


def _add_site(
    plan: EnginePlan,
    sums: ErrorMoments,
    site: str,
    x_tok_d: Tensor,
    n_train: int,
    ctx_test: Tensor,
    packed: SplitBuffer,
) -> None:
    """x and every SAE's error at one site of one batch (rows train-first) into the packed buffer."""
    packed.put("x", x_tok_d)
    x_norm = row_norms(x_tok_d)
    sums.contexts[site].add_x(ctx_test, x_tok_d[n_train:], x_norm[n_train:].square())
    for n in plan.groups[site]:
        sae = plan.saes[n]
        x_hat, codes = sae.reconstruct(x_tok_d.to(sae.dtype), chunk_size=RECONSTRUCT_CHUNK)
        err_tok_d = x_tok_d - x_hat.to(x_tok_d.dtype)  # the error as the SAE's consumers see it
        packed.put(f"{n}:e", err_tok_d)
        err_norm = row_norms(err_tok_d)[:, None]
        err_sq = err_norm.square()
        packed.put(f"{n}:en", err_norm)
        packed.put(f"{n}:e2", err_sq)
        err_sq_test = err_sq[n_train:, 0]
        sums.held_out[n].update(
            err_sq_test,
            x_norm[n_train:],
            row_norms(x_hat[n_train:]),
            codes.indices[n_train:],
            codes.values[n_train:],
        )
        sums.contexts[site].sse[n].index_add_(0, ctx_test, err_sq_test.cpu())


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
