"""The paper's error-prediction experiments as typed results, derived from one ``Decomposition``.

- ``error_prediction`` (Figs 1-3): per-SAE probes, FVU and FVU_nonlinear, and the power law
  FVU(W) = c + a·W^-m over the width sweep with a bootstrap over contexts;
- ``per_token`` (Figs 4, 5, 12, 16): R² of predicting SAE j's per-token squared error norm from SAE i's
  (Eq. 13, no intercept), the percent reduction of unexplained variance when SAE i's nonlinear-error
  norm is added (App. E), a token trace, and linear vs nonlinear norm samples;
- ``norm_prediction`` (Fig 6): R² of x̃ -> ‖q‖² for q in x, Sae(x), SaeError, LinearError, NonlinearError;
- ``probe_latents`` (Fig 14): the probe from Sae(x) − b_dec to ‖Sae(x) − b_dec‖² dotted with each unit
  decoder direction, against E[w²]/E[w] of that latent's (decoder-norm scaled) activation when active.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from darkmatter.errors import DataError
from darkmatter.experiments.decomposition import Decomposition, ols_from_gram
from darkmatter.results import Result
from darkmatter.sae.model import SAE
from darkmatter.stats import Moments, evaluate, fit_ridge
from darkmatter.stats.split import is_train
from darkmatter.store import ActivationStore


class ErrorPredictionResult(Result):
    """Figs 1-3: error probes, FVU_nonlinear and the scaling law over the width sweep."""

    saes: list[dict[str, Any]] = Field(description="Per-SAE statistics (see SAEStats), held-out tokens.")
    width_sweep: list[str] = Field(description="SAE names of the width sweep at fixed k, by width.")
    k_sweep: list[str] = Field(description="SAE names of the k sweep at fixed width, by L0.")
    power_law: dict[str, Any] | None = Field(
        None, description="Fit of FVU(W) = c + a W^-m with bootstrap CIs."
    )
    fvu_nonlinear_mean: float | None = Field(None, description="Mean FVU_nonlinear over the width sweep.")
    fvu_nonlinear_ci: list[float] | None = Field(None, description="Bootstrap CI of that mean.")
    n_train: int
    n_test: int
    figures: dict[str, dict[str, str]] = Field(default_factory=dict)


class PerTokenResult(Result):
    """Figs 4, 5, 12, 16: per-token predictability of larger SAEs' error norms from smaller ones'."""

    names: list[str]
    widths: list[int]
    r2: list[list[float | None]] = Field(description="R² of ‖e_j‖² from c·‖e_i‖² (row i < column j).")
    r2_intercept: list[list[float | None]] = Field(description="Same with an intercept.")
    r2_plain: list[list[float | None]] = Field(
        description="Unsquared norms with intercept (the code's variant)."
    )
    nonlinear_gain: list[list[float | None]] = Field(
        description="Percent reduction of unexplained variance when ‖NonlinearError_i‖² is added (App. E)."
    )
    trace: dict[str, Any] = Field(default_factory=dict, description="Token strings and per-SAE error norms.")
    mean_linear_norm: list[float]
    mean_nonlinear_norm: list[float]
    figures: dict[str, dict[str, str]] = Field(default_factory=dict)


class NormPredictionResult(Result):
    """Fig 6: how linearly predictable the squared norm of each component is from x."""

    quantities: list[str]
    r2: dict[str, dict[str, float]] = Field(description="SAE name -> quantity -> held-out R².")
    figures: dict[str, dict[str, str]] = Field(default_factory=dict)


class ProbeLatentsResult(Result):
    """Fig 14: norm probe directions against latent activation statistics."""

    sae: str
    probe_r2: float
    correlation: float = Field(description="Pearson r of probe·direction vs E[w²]/E[w] over latents.")
    correlation_mean: float = Field(description="Pearson r of probe·direction vs E[w] when active.")
    n_latents: int
    probe_dot: list[float]
    mean_active: list[float]
    figures: dict[str, dict[str, str]] = Field(default_factory=dict)


def family_roles(
    saes: Mapping[str, SAE], main_site: str, k: int | None, width: int | None
) -> tuple[list[str], list[str]]:
    """(width sweep at k, k sweep at width) among the SAEs at the main site; external families (``k`` None)
    take the first main-site SAE of each width, in family order, and all main-site SAEs by k."""
    main = {n: s for n, s in saes.items() if s.cfg.hook_site == main_site}
    if k is None:
        first: dict[int, str] = {}
        for n, s in main.items():
            first.setdefault(s.cfg.d_sae, n)
        ws = sorted(first.values(), key=lambda n: main[n].cfg.d_sae)
    else:
        ws = sorted((n for n, s in main.items() if s.cfg.k == k), key=lambda n: main[n].cfg.d_sae)
    ks = sorted(
        (n for n, s in main.items() if width is None or s.cfg.d_sae == width),
        key=lambda n: (main[n].cfg.k or 0, n),
    )
    return ws, ks


def error_prediction(
    dec: Decomposition,
    width_sweep: list[str],
    k_sweep: list[str],
    main_site: str,
    *,
    seed: int,
    n_boot: int = 200,
) -> tuple[dict[str, Any] | None, float | None, list[float] | None]:
    """Power-law fit over the width sweep with a bootstrap over contexts, and the FVU_nonlinear level."""
    from darkmatter.experiments import powerlaw

    if len(width_sweep) < 1:
        return None, None, None
    st = dec.stats
    ctx = dec.contexts[main_site]
    keep = ctx.n > 0
    args = (ctx.sum_x[keep], ctx.sum_sq_x[keep], ctx.n[keep])
    nl_mean = float(np.mean([st[n].fvu_nonlinear for n in width_sweep]))
    nl_boot = powerlaw.bootstrap_fvu(
        np.stack([ctx.sse_nonlinear[n][keep] for n in width_sweep]), *args, n_boot=n_boot, seed=seed
    )
    lo, hi = np.percentile(nl_boot.mean(axis=1), [2.5, 97.5])
    widths = [st[n].d_sae for n in width_sweep]
    fit: dict[str, Any] | None = None
    if len(set(widths)) >= 3:
        sse = np.stack([ctx.sse[n][keep] for n in width_sweep])
        fit = powerlaw.bootstrap_power_law(widths, sse, *args, n_boot=n_boot, seed=seed).to_dict()
    return fit, nl_mean, [float(lo), float(hi)]


def per_token(dec: Decomposition, names: list[str], main_site: str) -> dict[str, Any]:
    """Pairwise per-token regressions among ``names`` (ordered by width) from the norm Grams."""
    g = dec.norm_grams[main_site]
    col = {c: i for i, c in enumerate(g.columns)}
    n = len(names)
    out: dict[str, list[list[float | None]]] = {
        k: [[None] * n for _ in range(n)] for k in ("r2", "r2_intercept", "r2_plain", "nonlinear_gain")
    }
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if j <= i:
                continue
            y = col[f"{b}:e2"]
            out["r2"][i][j] = ols_from_gram(g.train, g.test, [col[f"{a}:e2"]], y, intercept=False)[1]
            _, r2i, ss1 = ols_from_gram(g.train, g.test, [col[f"{a}:e2"]], y, intercept=True)
            out["r2_intercept"][i][j] = r2i
            out["r2_plain"][i][j] = ols_from_gram(
                g.train, g.test, [col[f"{a}:en"]], col[f"{b}:en"], intercept=True
            )[1]
            _, _, ss2 = ols_from_gram(g.train, g.test, [col[f"{a}:e2"], col[f"{a}:nl2"]], y, intercept=True)
            out["nonlinear_gain"][i][j] = 100.0 * (ss1 - ss2) / ss1 if ss1 > 0 else None
    return out


def token_trace(
    table: Path, names: list[str], decode: Callable[[int], str], *, length: int = 100
) -> dict[str, Any]:
    """Error norms of ``names`` over ``length`` consecutive test-context tokens from the per-token table."""
    import pyarrow.parquet as pq

    cols = ["context", "position", "token", *[f"{n}:error_norm" for n in names]]
    t = pq.read_table(table, columns=cols)
    context = np.asarray(t.column("context"))
    first = int(context.min())
    sel = np.flatnonzero(context == first)
    pos = np.asarray(t.column("position"))[sel]
    order = sel[np.argsort(pos)][:length]
    tokens = np.asarray(t.column("token"))[order]
    return {
        "context": first,
        "positions": np.asarray(t.column("position"))[order].tolist(),
        "tokens": [decode(int(tok)) for tok in tokens],
        "error_norm": {
            n: np.asarray(t.column(f"{n}:error_norm"))[order].astype(float).tolist() for n in names
        },
    }


def norm_samples(
    table: Path, names: list[str], *, max_rows: int = 4000, seed: int = 0
) -> dict[str, list[list[float]]]:
    """Per-token linear and nonlinear error norms (a seeded sample of test tokens) for the Fig 12 violins."""
    import pyarrow.parquet as pq

    cols = ["split", *[f"{n}:{q}" for n in names for q in ("linear_norm", "nonlinear_norm")]]
    t = pq.read_table(table, columns=cols)
    test = np.flatnonzero(np.asarray(t.column("split")) == "test")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(test, size=min(max_rows, len(test)), replace=False))
    return {
        "linear": [np.asarray(t.column(f"{n}:linear_norm"))[pick].astype(float).tolist() for n in names],
        "nonlinear": [
            np.asarray(t.column(f"{n}:nonlinear_norm"))[pick].astype(float).tolist() for n in names
        ],
    }


@torch.no_grad()
def probe_latents(
    store: ActivationStore, sae: SAE, *, split_seed: int, train_fraction: float, batch_tokens: int = 4096
) -> dict[str, Any]:
    """Fig 14 for one SAE: fit ‖Sae(x) − b_dec‖² from Sae(x) − b_dec, compare with latent statistics."""
    site = str(sae.cfg.hook_site)
    d, w = sae.cfg.d_in, sae.cfg.d_sae
    mom = {p: Moments(d, {"s2": 1}) for p in ("train", "test")}
    sum_w = torch.zeros(w, dtype=torch.float64)
    sum_w2 = torch.zeros(w, dtype=torch.float64)
    count = torch.zeros(w, dtype=torch.float64)
    dec_norm = sae.W_dec.detach().double().norm(dim=1)
    for batch in store.iter_batches([site], batch_tokens=batch_tokens):
        x = batch.acts[site].to(sae.dtype)
        x_hat, codes = sae.reconstruct(x)
        s = (x_hat - sae.b_dec).float()
        train = is_train(batch.context, batch.position, split_seed, train_fraction)
        for part, mask in (("train", train), ("test", ~train)):
            if bool(mask.any()):
                mom[part].update(s[mask], {"s2": s[mask].pow(2).sum(1, keepdim=True)})
        idx = codes.indices[train].reshape(-1)
        val = codes.values[train].reshape(-1).double()
        active = val != 0
        idx, val = idx[active], val[active] * dec_norm[idx[active]]
        sum_w.index_add_(0, idx, val)
        sum_w2.index_add_(0, idx, val * val)
        count.index_add_(0, idx, torch.ones_like(val))
    fit = fit_ridge(mom["train"], "s2", bias=True)
    r2 = evaluate(fit, mom["test"], "s2").r2
    a = fit.weights[:, 0].double()
    unit = sae.W_dec.detach().double() / dec_norm[:, None].clamp_min(1e-12)
    dots = (unit @ a).numpy()
    alive = (count > 0).numpy()
    if alive.sum() < 3:
        raise DataError(f"Fewer than 3 latents of the SAE at {site} fire on the train split; cannot compare.")
    ratio = (sum_w2 / count.clamp_min(1)).numpy() / np.maximum((sum_w / count.clamp_min(1)).numpy(), 1e-12)
    mean = (sum_w / count.clamp_min(1)).numpy()
    return {
        "probe_r2": float(r2),
        "correlation": float(np.corrcoef(dots[alive], ratio[alive])[0, 1]),
        "correlation_mean": float(np.corrcoef(dots[alive], mean[alive])[0, 1]),
        "n_latents": int(alive.sum()),
        "probe_dot": dots[alive].astype(float).tolist(),
        "mean_active": ratio[alive].astype(float).tolist(),
    }
