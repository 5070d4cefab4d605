"""Between the passes: the error probes b* fitted on the train split and evaluated on the test split.

- ``vector_r2``: R² of e from x̃ = [x, 1], unweighted mean over output dimensions (the paper's number);
- ``fvu_nonlinear`` = FVU(x, Sae(x) + b*x̃) on test tokens; ``fvu − fvu_nonlinear`` is the linear share;
- ``norm_r2``: R² of ‖e‖² from x̃ (Eq. 10), and ``norm_r2_plain`` for ‖e‖;
every number also without the bias column (``*_nobias``, the original code's choice).
"""

from __future__ import annotations

import torch

from darkmatter.errors import DataError
from darkmatter.experiments.decomposition.accumulators import HeldOut, replicates_fit
from darkmatter.experiments.decomposition.error_moments import ErrorMoments
from darkmatter.experiments.decomposition.outputs import Probe, SAEStats
from darkmatter.experiments.decomposition.plan import EnginePlan
from darkmatter.stats import Moments, RidgeFit, evaluate, fit_ridge, fit_ridge_many
from darkmatter.stats import fvu_with_prediction as fvu_with_pred
from darkmatter.stats.jackknife import finite_interval


def fit_error_probes(plan: EnginePlan, sums: ErrorMoments, stats: dict[str, SAEStats]) -> dict[str, Probe]:
    """Fit every SAE's probe, fill its probe and held-out statistics; returns b* per SAE (float64: pass 2
    applies it in float64, so its statistics do not follow the float32 rounding of b*'s last bits)."""
    probes: dict[str, Probe] = {}
    for site, names in plan.groups.items():
        train, test = sums.total(site, "train"), sums.total(site, "test")
        var_x = test.total_variance_x()
        if not var_x > 0:
            raise DataError(f"x at {site} is constant over the {test.n} test tokens; FVU is undefined.")
        targets = [f"{n}:e" for n in names]
        fits = fit_ridge_many(train, targets, bias=True)
        fits_nobias = fit_ridge_many(train, targets, bias=False)
        for n in names:
            fit = fits[f"{n}:e"]
            _probe_stats(stats[n], fit, fits_nobias[f"{n}:e"], train, test, var_x)
            _held_out_stats(stats[n], sums.held_out[n], var_x)
            assert fit.bias is not None
            probes[n] = (
                fit.weights.to(device=plan.device, dtype=torch.float64),
                fit.bias.to(device=plan.device, dtype=torch.float64),
            )
    return probes


def _probe_stats(
    st: SAEStats, fit: RidgeFit, fit_nobias: RidgeFit, train: Moments, test: Moments, var_x: float
) -> None:
    """Held-out vector and norm R², FVU_nonlinear, with and without the bias column."""
    n = st.name
    ev = evaluate(fit, test, f"{n}:e")
    ev_nobias = evaluate(fit_nobias, test, f"{n}:e")
    st.vector_r2, st.vector_r2_weighted = ev.r2_mean_over_dims, ev.r2_variance_weighted
    st.vector_r2_nobias = ev_nobias.r2_mean_over_dims
    st.constant_dims = int(ev.constant_dims)
    st.fvu_nonlinear = fvu_with_pred(ev, var_x)
    st.fvu_nonlinear_nobias = fvu_with_pred(ev_nobias, var_x)
    st.ridge = float(fit.ridge)
    st.norm_r2 = evaluate(fit_ridge(train, f"{n}:e2", bias=True), test, f"{n}:e2").r2
    st.norm_r2_nobias = evaluate(fit_ridge(train, f"{n}:e2", bias=False), test, f"{n}:e2").r2
    st.norm_r2_plain = evaluate(fit_ridge(train, f"{n}:en", bias=True), test, f"{n}:en").r2


def _held_out_stats(st: SAEStats, held: HeldOut, var_x: float) -> None:
    st.fvu, st.nmse, st.norm_ratio = held.sse / var_x, held.nmse_sum / held.n, held.ratio_sum / held.n
    st.l0, st.dead_fraction = held.l0.compute(), held.l0.dead_fraction()


JACKKNIFED = ("fvu", "fvu_nonlinear", "vector_r2", "norm_r2")
"""The per-SAE numbers that get delete-one-block jackknife replicates (and from them intervals)."""


def jackknife_error_stats(plan: EnginePlan, sums: ErrorMoments, stats: dict[str, SAEStats]) -> None:
    """Refit every probe of the interval site with each block of contexts left out; store the replicates
    and the 95% intervals of FVU, FVU_nonlinear, vector R² and norm R² in each SAE's ``SAEStats``."""
    site = plan.interval_site
    if site is None or plan.blocks(site) < 3:
        return
    if not replicates_fit(sums.moments[(site, "train")], sums.moments[(site, "test")]):
        return  # too few tokens to refit the probes without a block: no intervals
    names = plan.groups[site]

    def replicate(b: int) -> list[float]:
        """Block ``b`` left out: per SAE, the ``JACKKNIFED`` numbers, in order."""
        train, test = sums.total(site, "train", without=b), sums.total(site, "test", without=b)
        var_x = test.total_variance_x()
        fits = fit_ridge_many(train, [f"{n}:e" for n in names], bias=True)
        kept = _contexts_outside(plan, site, b)
        row: list[float] = []
        for n in names:
            ev = evaluate(fits[f"{n}:e"], test, f"{n}:e")
            row += [
                float(sums.contexts[site].sse[n][kept].sum()) / var_x,
                fvu_with_pred(ev, var_x),
                ev.r2_mean_over_dims,
                evaluate(fit_ridge(train, f"{n}:e2", bias=True), test, f"{n}:e2").r2,
            ]
        return row

    # under torchrun each rank refits its share of the blocks (the moments are the same on every rank)
    table = plan.ranks.rows(plan.blocks(site), len(names) * len(JACKKNIFED), replicate)
    replicates = {
        n: {k: table[:, i * len(JACKKNIFED) + j].tolist() for j, k in enumerate(JACKKNIFED)}
        for i, n in enumerate(names)
    }
    for n in names:
        st = stats[n]
        st.jackknife = {k: [float(v) for v in vals] for k, vals in replicates[n].items()}
        intervals = {k: finite_interval(getattr(st, k), vals) for k, vals in replicates[n].items()}
        st.intervals = {k: v for k, v in intervals.items() if v is not None}


def _contexts_outside(plan: EnginePlan, site: str, block: int) -> torch.Tensor:
    """Bool [n_contexts]: the contexts not in ``block``."""
    contexts = torch.arange(plan.store.n_contexts)
    blocks = torch.tensor([plan.block_of(site, int(c)) for c in contexts])
    return blocks != block
