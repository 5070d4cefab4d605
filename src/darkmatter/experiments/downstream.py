"""Downstream cross-entropy of splicing SAE reconstructions and error components (paper Figs 8 and 9).

For each SAE, the model runs on held-out contexts with the SAE's site replaced, at positions ``>= start``, by

- ``sae``: Sae(x);
- ``sae+linear``: Sae(x) + LinearError(x), LinearError(x) = x @ W + b the SAE's error probe b*;
- ``sae+nonlinear``: Sae(x) + NonlinearError(x), NonlinearError = x − Sae(x) − LinearError;
- ``sae+both``: Sae(x) + LinearError + NonlinearError, which is x up to rounding: a built-in check that the
  decomposition and the splice are exact (``both_max_abs_ce_diff``; a mean difference above
  ``both_tolerance`` nats raises DataError);
- ``zero``: zero ablation, and ``mean``: the site's mean activation (when ``mean_acts`` gives one).

Scored positions are ``start .. ctx_len − 2`` (the last position has no next token). On them we report the
mean next-token CE and the mean KL(clean ‖ setting) of every setting, the paper's CE recovered by each
component, ``ce_recovered_c = (L_sae − L_sae+c) / (L_sae − L_clean)``, the SAELens-style
``ce_loss_score = (L_zero − L_sae) / (L_zero − L_clean)`` and ``kl_score = (KL_zero − KL_sae) / KL_zero``,
and two reference predictors of the CE shares (the original code loaded them from files no script
produced, paper-experiments §7 and §15.6; these are our definitions, on the same scored positions):

- ``variance_share_c = (FVU(x, Sae(x)) − FVU(x, Sae(x) + c)) / FVU(x, Sae(x))``, the share of the variance
  left by the SAE that adding component c recovers (the paper's "R² % recovered"; equal to
  1 − Σ‖other component‖² / Σ‖SaeError‖²);
- ``norm_share_c = mean‖c‖ / mean‖SaeError‖``.

Cost (see ``darkmatter.experiments.splice``): with ``prefix_cache`` (the default) each batch runs the
model once, clean; every spliced pass replays the unchanged layers' output and computes only the later
layers, with logits only for positions ``>= start``. ``prefix_cache=False`` runs the full forward for
every setting (the two agree to float rounding). Memory is one batch: its clean activations at the needed
sites and its clean log-probabilities ``[batch, ctx_len − start − 1, vocab]`` (float32).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field

from darkmatter.errors import ConfigError, ShapeError
from darkmatter.experiments.downstream_scores import (
    CE_EPS,
    ComponentShares,
    ce_intervals,
    ce_scores,
    check_both,
    ratio,
)
from darkmatter.experiments.inputs import (
    check_probe,
    check_sae_site,
    check_tokens,
    model_device,
    model_identity,
    model_of,
    model_width,
    on_device,
    probe_on,
    sae_recon,
    site_order,
)
from darkmatter.experiments.splice import (
    EngineOutput,
    SpliceUnit,
    UnitTally,
    gather_splices,
    rank_batches,
    record_layer_outputs,
    replay_prefix,
    resume_layer,
    run_splices,
)
from darkmatter.hashing import sha256_hex, stable_hash
from darkmatter.lm.sites import Site
from darkmatter.progress import Progress
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.results import Result, sae_identity
from darkmatter.sae.model import SAE

__all__ = [
    "CE_EPS",
    "SETTINGS",
    "ComponentShares",
    "DownstreamResult",
    "DownstreamSAE",
    "EngineOutput",
    "SpliceUnit",
    "UnitTally",
    "ce_intervals",
    "ce_scores",
    "check_both",
    "check_probe",
    "check_sae_site",
    "check_tokens",
    "downstream_ce",
    "model_of",
    "model_width",
    "ratio",
    "record_layer_outputs",
    "replay_prefix",
    "resume_layer",
    "run_splices",
    "site_order",
]

Tensor = torch.Tensor

SETTINGS = ("sae", "sae+linear", "sae+nonlinear", "sae+both", "zero")
"""Spliced settings of ``downstream_ce`` (plus ``mean`` when a mean activation is given)."""

# --------------------------------------------------------------------------- results


class DownstreamSAE(BaseModel):
    """Downstream numbers of one SAE on the scored positions of the held-out contexts."""

    site: str = Field(description="Hook site the SAE reads and the splice replaces.")
    d_sae: int = Field(description="Latents of the SAE.")
    ce: dict[str, float] = Field(
        description="Mean next-token CE (nats) per setting, 'clean' included, all over the same scored "
        "tokens ('sae+both' only when its check ran on every batch)."
    )
    kl: dict[str, float] = Field(description="Mean KL(clean ‖ setting) (nats) per spliced setting (as ce).")
    ce_recovered_linear: float | None = Field(
        description="(L_sae − L_sae+linear) / (L_sae − L_clean), the paper's CE recovered (a fraction)."
    )
    ce_recovered_nonlinear: float | None = Field(
        description="(L_sae − L_sae+nonlinear) / (L_sae − L_clean) (a fraction)."
    )
    ce_loss_score: float | None = Field(description="SAELens: (L_zero − L_sae) / (L_zero − L_clean).")
    kl_score: float | None = Field(description="SAELens: (KL_zero − KL_sae) / KL_zero.")
    ce_loss_score_mean: float | None = Field(
        None, description="(L_mean − L_sae) / (L_mean − L_clean), against mean ablation (when run)."
    )
    both_max_abs_ce_diff: float = Field(
        description="Max over scored tokens of |CE(sae+both) − CE(clean)|: the exactness check."
    )
    both_mean_ce_diff: float = Field(
        description="|mean CE(sae+both) − mean CE(clean)| on the tokens the check ran on (must be tiny)."
    )
    both_scored_tokens: int = Field(description="Scored tokens the sae+both check ran on.")
    intervals: dict[str, list[float]] = Field(
        default_factory=dict,
        description="ce_recovered_linear, ce_recovered_nonlinear, ce_recovered_sum (linear + nonlinear) and "
        "ce_recovered_gap (linear − nonlinear) -> [low, high]: 95% delete-one-context jackknife (empty with "
        "fewer than 3 contexts).",
    )
    variance_share_linear: float | None = Field(
        description="(FVU(x, Sae) − FVU(x, Sae + Linear)) / FVU(x, Sae) (reference predictor)."
    )
    variance_share_nonlinear: float | None = Field(
        description="(FVU(x, Sae) − FVU(x, Sae + Nonlinear)) / FVU(x, Sae) (reference predictor)."
    )
    norm_share_linear: float | None = Field(description="mean‖LinearError‖ / mean‖SaeError‖.")
    norm_share_nonlinear: float | None = Field(description="mean‖NonlinearError‖ / mean‖SaeError‖.")
    fvu_sae: float = Field(description="FVU(x, Sae(x)) on the scored positions.")
    fvu_sae_linear: float = Field(description="FVU(x, Sae(x) + LinearError) (= FVU_nonlinear here).")
    fvu_sae_nonlinear: float = Field(description="FVU(x, Sae(x) + NonlinearError).")
    mean_error_norm: float = Field(description="mean‖SaeError‖ on the scored positions.")
    mean_linear_norm: float = Field(description="mean‖LinearError‖.")
    mean_nonlinear_norm: float = Field(description="mean‖NonlinearError‖.")
    seconds: float = Field(description="Wall time of this SAE's spliced passes.")


class DownstreamResult(Result):
    """Figs 8/9: CE of splicing each SAE and each error component back into the model."""

    experiment: str = "downstream_ce"
    n_contexts: int = Field(description="Held-out contexts evaluated.")
    ctx_len: int = Field(description="Tokens per context.")
    start: int = Field(description="First spliced and scored position.")
    scored_tokens: int = Field(description="Predictions scored: n_contexts × (ctx_len − start − 1).")
    clean_ce: float = Field(description="Mean CE of the unmodified model on the scored positions.")
    saes: dict[str, DownstreamSAE] = Field(description="Per-SAE numbers, by SAE name.")
    prefix_cache: bool = Field(description="Spliced passes replayed the unchanged layers' clean output.")
    forward_passes: int = Field(description="Model calls made (clean + spliced).")
    seconds: float = Field(description="Wall time of the whole experiment.")


# --------------------------------------------------------------------------- the experiment


def _sae_unit(
    name: str, site: Site, sae: SAE, probe: tuple[Tensor, Tensor], shares: ComponentShares
) -> SpliceUnit:
    """The splice unit of one SAE: Sae(x) and each error component added back (the SAE and its probe on
    the model's device)."""
    w, b = probe

    def compute(x: Tensor, _ups: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        xf = x.float()
        sae_x = sae_recon(sae, x)
        lin = torch.addmm(b, xf, w)
        nl = (xf - sae_x) - lin
        reps = {
            "sae": sae_x,
            "sae+linear": sae_x + lin,
            "sae+nonlinear": sae_x + nl,
            "sae+both": sae_x + lin + nl,
        }
        return reps, {"sae": sae_x, "linear": lin}

    def observe(x: Tensor, extras: Mapping[str, Tensor]) -> None:
        shares.update(x.float(), extras["sae"], extras["linear"])

    return SpliceUnit(name=name, site=site, compute=compute, observe=observe)


def _ablation_unit(site: Site, mean: Tensor | None) -> SpliceUnit:
    """Zero (and mean) ablation of a site: one pass each per batch, shared by every SAE of the site."""

    def compute(x: Tensor, _ups: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        xf = x.float()
        reps = {"zero": torch.zeros_like(xf)}
        if mean is not None:
            reps["mean"] = mean.to(xf).expand_as(xf)
        return reps, {}

    return SpliceUnit(name=_ablation_name(site), site=site, compute=compute)


def _ablation_name(site: Site) -> str:
    return f"ablation@{site.name}"


def _check_options(saes: Mapping[str, SAE], both_tolerance: float, both_batches: int | None) -> None:
    if not saes:
        raise ConfigError("downstream_ce needs at least one SAE.")
    if not (math.isfinite(both_tolerance) and both_tolerance > 0):
        raise ConfigError(f"both_tolerance must be a positive number of nats, found {both_tolerance}.")
    if both_batches is not None and (isinstance(both_batches, bool) or both_batches < 1):
        raise ConfigError(f"both_batches must be None (every batch) or >= 1, found {both_batches!r}.")


def _mean_act(mean_acts: Mapping[str, Tensor] | None, site: Site, d: int) -> Tensor | None:
    """The site's ``[d]`` mean activation as float32, or None when no mean ablation runs there."""
    if mean_acts is None or site.name not in mean_acts:
        return None
    mean = torch.as_tensor(mean_acts[site.name]).detach().float()
    if tuple(mean.shape) != (d,):
        raise ShapeError(f"mean_acts[{site.name!r}] has shape {list(mean.shape)}, expected [{d}].")
    return mean


def _sae_units(
    model: torch.nn.Module,
    saes: Mapping[str, SAE],
    probes: Mapping[str, tuple[Tensor, Tensor]],
    mean_acts: Mapping[str, Tensor] | None,
    both_batches: int | None,
    dtype: torch.dtype | None = None,
) -> tuple[list[SpliceUnit], dict[str, ComponentShares], dict[str, str]]:
    """A checked splice unit per SAE, one ablation unit per site, the reference predictors each SAE feeds,
    and the ablation unit of each SAE; every SAE (in ``dtype``, None: its own), probe and sum is on the
    model's device."""
    d = model_width(model)
    device = model_device(model)
    units, shares, ablations, ablation_of = [], {}, {}, {}
    for name, sae in saes.items():
        site = check_sae_site(model, name, sae)
        if name not in probes:
            raise ConfigError(f"No error probe given for SAE {name!r}; probes has {sorted(probes)}.")
        probe = probe_on(check_probe(name, probes[name], d), device)
        if site.name not in ablations:
            ablations[site.name] = _ablation_unit(site, _mean_act(mean_acts, site, d))
        ablation_of[name] = _ablation_name(site)
        shares[name] = ComponentShares(d, device)
        unit = _sae_unit(name, site, on_device(sae, device, dtype), probe, shares[name])
        if both_batches is not None:
            unit.limit_batches["sae+both"] = both_batches
        units.append(unit)
    return units + list(ablations.values()), shares, ablation_of


def _sae_numbers(
    unit: SpliceUnit, d_sae: int, out: EngineOutput, ablation_unit: str, shares: ComponentShares, tol: float
) -> DownstreamSAE:
    """One SAE's result from its tally (and its site's ablations'): CE and KL per setting, scores, the
    exactness check (``tol`` nats), the reference predictors."""
    tally, ablation = out.tallies[unit.name], out.tallies[ablation_unit]
    clean = out.clean_ce_sum / out.n_scored
    both_mean = check_both(unit.name, tally.mean("ce", "sae+both"), tally.mean("clean", "sae+both"), tol)
    # every CE and KL reported is over the same scored tokens: a check limited to the first batches is
    # reported by its own fields (both_*), not beside settings that ran on every context
    full = tally.n["sae"]
    ce = {"clean": clean} | {k: t.mean("ce", k) for t in (tally, ablation) for k in t.ce if t.n[k] == full}
    kl = {k: t.mean("kl", k) for t in (tally, ablation) for k in t.kl if t.n[k] == full}
    return DownstreamSAE(
        site=unit.site.name,
        d_sae=d_sae,
        ce=ce,
        kl=kl,
        **ce_scores(ce, kl),  # type: ignore[arg-type]
        both_max_abs_ce_diff=tally.max_abs_ce_diff["sae+both"],
        both_mean_ce_diff=both_mean,
        both_scored_tokens=tally.n["sae+both"],
        **shares.compute(),  # type: ignore[arg-type]
        intervals=ce_intervals(tally, out.clean_per_context),
        seconds=tally.seconds,
    )


def _inputs_identity(
    lm: Any, model: torch.nn.Module, tokens: np.ndarray, saes: Mapping[str, SAE]
) -> dict[str, Any]:
    """The config entries of what the result depends on besides the options: model, contexts, SAEs."""
    return {
        "model": model_identity(lm, model),
        "contexts": {
            "n": int(tokens.shape[0]),
            "ctx_len": int(tokens.shape[1]),
            "sha256": sha256_hex(tokens.tobytes())[:16],
        },
        "saes": {name: sae_identity(sae) for name, sae in saes.items()},
    }


def downstream_ce(
    lm: Any,
    contexts_tokens: np.ndarray,
    saes: Mapping[str, SAE],
    probes: Mapping[str, tuple[Tensor, Tensor]],
    *,
    start: int,
    batch_size: int = 4,
    mean_acts: Mapping[str, Tensor] | None = None,
    prefix_cache: bool = True,
    both_tolerance: float = 1e-3,
    both_batches: int | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    dtype: torch.dtype | None = None,
    ranks: Ranks = SINGLE,
) -> DownstreamResult:
    """Paper Figs 8/9 on held-out contexts ``[n, ctx_len]`` (see the module docstring).

    ``lm`` is a ``LoadedLM`` or a HF causal LM; ``saes[name]`` reads ``sae.cfg.hook_site`` and
    ``probes[name] = (weights [d, d], bias [d])`` is its error probe. ``mean_acts[site]`` (a ``[d]`` mean
    activation, e.g. over the store's train tokens) adds the ``mean`` ablation for SAEs at that site.
    ``both_batches`` runs the ``sae+both`` check on the first N batches only (None: all; it costs one
    spliced pass per SAE and batch, 1/4 of its spliced work); its CE and KL then cover those batches and
    are compared with the clean CE on the same tokens. ``seed`` is only recorded (nothing is random).
    Everything runs on the model's device: the SAEs (in ``dtype``, None: their own) and probes go there.

    ``ranks``: under ``torchrun`` every rank holds the model, SAEs and contexts and runs a contiguous share
    of whole batches (maybe none; ``both_batches`` counts from the first batch); the sums and per-context
    lists meet in rank order and every rank returns one process's result (up to float64 summation order).
    """
    t_start = time.perf_counter()
    model = model_of(lm)
    _check_options(saes, both_tolerance, both_batches)
    tokens = check_tokens(contexts_tokens, model, start)
    units, shares, ablation_of = _sae_units(model, saes, probes, mean_acts, both_batches, dtype)
    out = run_splices(
        model,
        tokens,
        units,
        start=start,
        batch_size=batch_size,
        prefix_cache=prefix_cache,
        progress=progress,
        batches=rank_batches(len(tokens), batch_size, ranks),
    )
    out, shares = gather_splices(ranks, out, shares, ComponentShares.cpu)
    clean = out.clean_ce_sum / out.n_scored
    per_sae = {
        u.name: _sae_numbers(
            u, saes[u.name].cfg.d_sae, out, ablation_of[u.name], shares[u.name], both_tolerance
        )
        for u in units
        if u.name in saes
    }
    config = {
        "start": int(start),
        "batch_size": batch_size,
        "prefix_cache": prefix_cache,
        "both_tolerance": both_tolerance,
        "both_batches": both_batches,
        "mean_ablation_sites": sorted(mean_acts) if mean_acts else [],
    } | _inputs_identity(lm, model, tokens, saes)
    return DownstreamResult(
        config_hash=stable_hash(config),
        seed=seed,
        config=config,
        n_contexts=int(tokens.shape[0]),
        ctx_len=int(tokens.shape[1]),
        start=int(start),
        scored_tokens=out.n_scored,
        clean_ce=clean,
        saes=per_sae,
        prefix_cache=prefix_cache,
        forward_passes=out.forward_passes,
        seconds=time.perf_counter() - t_start,
    )
