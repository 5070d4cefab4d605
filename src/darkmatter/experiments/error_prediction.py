"""Figs 1-3 beyond the engine's per-SAE numbers: the scaling law FVU(W) = c + a·W^-m over the width sweep
(a bootstrap over contexts) and the level of FVU_nonlinear (a jackknife over blocks of contexts with every
probe refitted, or, without blocks, a bootstrap over contexts with the probes held fixed)."""

from __future__ import annotations

from typing import Any

import numpy as np

from darkmatter.experiments import powerlaw
from darkmatter.experiments.decomposition import Decomposition
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.stats.jackknife import jackknife_interval


def scaling_law(
    dec: Decomposition,
    width_sweep: list[str],
    site: str,
    *,
    seed: int,
    n_boot: int = 200,
    ranks: Ranks = SINGLE,
) -> tuple[dict[str, Any] | None, float | None, list[float] | None]:
    """(power-law bootstrap, mean FVU_nonlinear over the sweep, its 95% bootstrap interval).

    The power law needs at least three widths; the bootstrap resamples contexts of the test split.
    """
    if len(width_sweep) < 1:
        return None, None, None
    st = dec.stats
    ctx = dec.contexts[site]
    keep = ctx.n > 0
    args = (ctx.sum_x[keep], ctx.sum_sq_x[keep], ctx.n[keep])
    nl_mean = float(np.mean([st[n].fvu_nonlinear for n in width_sweep]))
    replicates = [st[n].jackknife.get("fvu_nonlinear") for n in width_sweep]
    if all(replicates):
        lo, hi = jackknife_interval(nl_mean, np.mean(np.asarray(replicates, dtype=float), axis=0).tolist())
    else:
        nl_boot = powerlaw.bootstrap_fvu(
            np.stack([ctx.sse_nonlinear[n][keep] for n in width_sweep]), *args, n_boot=n_boot, seed=seed
        )
        lo, hi = np.percentile(nl_boot.mean(axis=1), [2.5, 97.5])
    widths = [st[n].d_sae for n in width_sweep]
    fit: dict[str, Any] | None = None
    if len(set(widths)) >= 3:
        sse = np.stack([ctx.sse[n][keep] for n in width_sweep])
        boot = powerlaw.bootstrap_power_law(widths, sse, *args, n_boot=n_boot, seed=seed, ranks=ranks)
        fit = boot.to_dict()
    return fit, nl_mean, [float(lo), float(hi)]
