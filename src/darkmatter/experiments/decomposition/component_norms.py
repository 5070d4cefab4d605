"""Pass 2: b* applied to every token. LinearError = b*x̃, NonlinearError = e − b*x̃.

It gives the cosine of b*x̃ with x, the norm-prediction test (R² of ‖q‖² from x̃ for q in x, Sae(x), e,
linear, nonlinear), and the per-token norms and table columns (spilled to disk: see ``spill``) behind the
per-token scaling regressions and the per-token table.
"""

from __future__ import annotations

import numpy as np
import torch

from darkmatter.experiments.decomposition.accumulators import (
    ContextAccumulator,
    SplitBuffer,
    merged,
    replicates_fit,
)
from darkmatter.experiments.decomposition.outputs import NORM_TEST_QUANTITIES, Probe, SAEStats
from darkmatter.experiments.decomposition.plan import RECONSTRUCT_CHUNK, EnginePlan
from darkmatter.experiments.decomposition.spill import GroupSpill
from darkmatter.ranks import Ranks
from darkmatter.stats import Cosine, Moments, evaluate, fit_ridge
from darkmatter.stats.jackknife import finite_interval

Tensor = torch.Tensor


class ComponentNorms:
    """Pass 2's accumulators: norm moments per (site, split) and per-SAE held-out sums."""

    def __init__(self, plan: EnginePlan, probes: dict[str, Probe], contexts: dict[str, ContextAccumulator]):
        self.plan, self.probes, self.contexts = plan, probes, contexts
        self.moments: dict[tuple[str, str], list[Moments]] = {}  # (site, part) -> one per block
        for site, names in plan.groups.items():
            targets = {"x2": 1} | {f"{n}:{q}": 1 for n in names for q in NORM_TEST_QUANTITIES[1:]}
            blocks = plan.blocks(site)
            for part in ("train", "test"):
                self.moments[(site, part)] = [Moments(plan.width[site], targets) for _ in range(blocks)]
        self.cosine = {n: Cosine(sae.cfg.d_in) for n, sae in plan.saes.items()}
        self.sse_nonlinear = dict.fromkeys(plan.saes, 0.0)
        self.norm_sums = {n: np.zeros(3) for n in plan.saes}  # Σ‖e‖, Σ‖linear‖, Σ‖nonlinear‖ on test

    def run(self, spill: GroupSpill) -> None:
        """The pass over the store; per-token norms and table columns go to ``spill``."""
        plan = self.plan
        storage = plan.packed_storage({key: blocks[0] for key, blocks in self.moments.items()})
        for batch in plan.batches():
            order, n_train = plan.split.train_first(batch.context, batch.position)
            ctx_test = batch.context[order[n_train:]].cpu()
            table_cols: dict[str, Tensor] = {}
            norms: dict[str, Tensor] = {}
            blocks: dict[str, int] = {}
            for site in plan.groups:
                x_tok_d = batch.acts[site][order]
                buf = storage[site][: len(x_tok_d)]
                blocks[site] = block = plan.block_of(site, int(batch.context[0]))
                moments = (self.moments[(site, "train")][block], self.moments[(site, "test")][block])
                packed = SplitBuffer(*moments, n_train, buf)
                norms[site] = self._add_site(site, x_tok_d, n_train, ctx_test, packed, table_cols)
                packed.commit()
            plan.batch_done(len(order))
            inverse = torch.argsort(order)
            train = torch.zeros(len(order), dtype=torch.bool, device=order.device)
            train[:n_train] = True
            spill.add(
                batch, train[inverse], norms, {k: v[inverse] for k, v in table_cols.items()}, n_train, blocks
            )
        reduce_component_norms(self, plan.ranks)

    def _add_site(
        self,
        site: str,
        x_tok_d: Tensor,
        n_train: int,
        ctx_test: Tensor,
        packed: SplitBuffer,
        table_cols: dict[str, Tensor],
    ) -> Tensor:
        packed.put("x", x_tok_d)
        packed.put("x2", x_tok_d.pow(2).sum(1, keepdim=True))
        x64 = x_tok_d.double()  # once per batch and site: every SAE's b*x̃ reads it
        norms = [
            self._add_sae(site, n, x_tok_d, x64, n_train, ctx_test, packed, table_cols)
            for n in self.plan.groups[site]
        ]
        # [n, 2·SAEs] float32, rows train-first: the norm Gram's inputs, finished in `merge_spills`
        return torch.cat([e2 for e2, _ in norms] + [nl2 for _, nl2 in norms], 1)

    def _add_sae(
        self,
        site: str,
        name: str,
        x_tok_d: Tensor,
        x64: Tensor,
        n_train: int,
        ctx_test: Tensor,
        packed: SplitBuffer,
        table_cols: dict[str, Tensor],
    ) -> tuple[Tensor, Tensor]:
        """One SAE's components on a batch; returns its squared error and nonlinear-error norms [n, 1]."""
        sae = self.plan.saes[name]
        x_hat, codes = sae.reconstruct(x_tok_d.to(sae.dtype), chunk_size=RECONSTRUCT_CHUNK)
        x_hat = x_hat.to(x_tok_d.dtype)
        err = x_tok_d - x_hat  # the error as the SAE's consumers see it (pass 1's e)
        weights, bias = self.probes[name]
        # b*x̃ in float64: an ill-conditioned probe (large weights that cancel) applied in float32 would make
        # every statistic below follow the rounding of b*'s last bits
        linear = torch.addmm(bias, x64, weights)
        nonlinear = err.double() - linear
        parts = {"sae": x_hat, "error": err, "linear": linear, "nonlinear": nonlinear}
        sq = {k: v.pow(2).sum(1, keepdim=True) for k, v in parts.items()}  # each [n, 1]
        for k, v in sq.items():
            packed.put(f"{name}:{k}", v)
        if n_train < len(x_tok_d):
            self.cosine[name].update(linear[n_train:], x_tok_d[n_train:])
            nl2_test = sq["nonlinear"][n_train:, 0].double().cpu()
            self.sse_nonlinear[name] += float(nl2_test.sum())
            self.contexts[site].sse_nonlinear[name].index_add_(0, ctx_test, nl2_test)
            self.norm_sums[name] += np.array(
                [float(sq[k][n_train:].sqrt().sum()) for k in ("error", "linear", "nonlinear")]
            )
        table_cols[f"{name}:l0"] = (codes.values != 0).sum(-1).to(torch.float32)
        for k in ("error", "linear", "nonlinear"):
            table_cols[f"{name}:{k}_norm"] = sq[k][:, 0].sqrt().float()
        return sq["error"], sq["nonlinear"]

    def finish(self, stats: dict[str, SAEStats], n_test: int) -> None:
        """Fill the norm-test, cosine and mean-norm statistics."""
        for site, names in self.plan.groups.items():
            train, test = self._total(site, "train"), self._total(site, "test")
            var_x = test.total_variance_x()
            for n in names:
                st = stats[n]
                st.norm_test = _norm_test(train, test, n)
                st.cos_linear_x = self.cosine[n].compute()
                st.fvu_nonlinear_pass2 = self.sse_nonlinear[n] / var_x
                mean = self.norm_sums[n] / max(n_test, 1)
                st.mean_error_norm, st.mean_linear_norm, st.mean_nonlinear_norm = (float(v) for v in mean)
        self._norm_test_intervals(stats)

    def _total(self, site: str, part: str, without: int | None = None) -> Moments:
        return merged(self.moments[(site, part)], without)

    def _norm_test_intervals(self, stats: dict[str, SAEStats]) -> None:
        """Delete-one-block jackknife of the norm test at the interval site (the probes b* held fixed)."""
        site = self.plan.interval_site
        if site is None or self.plan.blocks(site) < 3:
            return
        if not replicates_fit(self.moments[(site, "train")], self.moments[(site, "test")]):
            return
        names = self.plan.groups[site]
        quantities = list(NORM_TEST_QUANTITIES)

        def replicate(b: int) -> list[float]:
            train, test = self._total(site, "train", b), self._total(site, "test", b)
            return [r2 for n in names for r2 in (_norm_test(train, test, n)[q] for q in quantities)]

        # under torchrun each rank refits its share of the blocks (the moments are the same on every rank)
        table = self.plan.ranks.rows(self.plan.blocks(site), len(names) * len(quantities), replicate)
        replicates = {
            n: {q: table[:, i * len(quantities) + j].tolist() for j, q in enumerate(quantities)}
            for i, n in enumerate(names)
        }
        for n in names:
            st = stats[n]
            for q, values in replicates[n].items():
                st.jackknife[f"norm_test.{q}"] = values
                interval = finite_interval(st.norm_test[q], values)
                if interval is not None:
                    st.intervals[f"norm_test.{q}"] = interval


def _norm_test(train: Moments, test: Moments, name: str) -> dict[str, float]:
    """Held-out R² of x̃ -> ‖q‖² for q in x and each of ``name``'s components (Fig 6)."""
    out = {"x": evaluate(fit_ridge(train, "x2", bias=True), test, "x2").r2}
    for q in NORM_TEST_QUANTITIES[1:]:
        out[q] = evaluate(fit_ridge(train, f"{name}:{q}", bias=True), test, f"{name}:{q}").r2
    return out


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
