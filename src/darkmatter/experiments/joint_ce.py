"""Downstream CE of splicing the joint map's reconstruction x̂' = Sae(x) + J(regressor reconstructions).

The regressor sites run before the target site, so a splice at the target leaves them unchanged: the
splice engine (``darkmatter.experiments.splice``) computes x̂' from the same forward pass. Under ``torchrun``
each rank splices a contiguous share of whole batches and the sums meet in rank order, as in ``downstream``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from pydantic import Field

from darkmatter.errors import HookSiteError
from darkmatter.experiments.downstream_scores import check_both, fvu_on_cpu, ratio
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
from darkmatter.experiments.joint_map import SELF, Block, JointMap, check_joint_map, regressors
from darkmatter.experiments.splice import SpliceUnit, gather_splices, rank_batches, run_splices
from darkmatter.hashing import stable_hash
from darkmatter.lm.sites import Site
from darkmatter.progress import Progress
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.results import Result, sae_identity
from darkmatter.sae.model import SAE
from darkmatter.stats import FVU

Tensor = torch.Tensor


class JointCEResult(Result):
    """CE of splicing x̂' = Sae(x) + J(regressor reconstructions) at the target site."""

    experiment: str = "downstream_ce_joint"
    target_site: str
    blocks: list[tuple[str, str, int]] = Field(description="(name, site, width) of the joint map's inputs.")
    n_contexts: int
    ctx_len: int
    start: int
    scored_tokens: int
    ce: dict[str, float] = Field(description="Mean CE per setting: clean, sae, sae+joint, zero, ...")
    kl: dict[str, float] = Field(description="Mean KL(clean ‖ setting) per spliced setting.")
    ce_recovered_joint: float | None = Field(description="(L_sae − L_sae+joint) / (L_sae − L_clean).")
    ce_recovered_linear: float | None = Field(
        None, description="(L_sae − L_sae+linear) / (L_sae − L_clean), when a probe is given."
    )
    ce_loss_score: float | None = Field(description="(L_zero − L_sae) / (L_zero − L_clean).")
    ce_loss_score_joint: float | None = Field(description="(L_zero − L_sae+joint) / (L_zero − L_clean).")
    both_max_abs_ce_diff: float = Field(description="Max |CE(x̂' + (x − x̂')) − CE(clean)| per token.")
    both_mean_ce_diff: float
    fvu_sae: float = Field(description="FVU(x, Sae(x)) on the scored positions.")
    fvu_sae_joint: float = Field(description="FVU(x, x̂') on the scored positions.")
    fvu_sae_linear: float | None = Field(None, description="FVU(x, Sae(x) + LinearError), with a probe.")
    prefix_cache: bool
    forward_passes: int
    seconds: float


def _upstream_sites(
    model: torch.nn.Module, target: Site, blocks: list[Block], regressor_saes: Mapping[str, SAE]
) -> list[str]:
    """The regressor sites in block order, each checked to run before the target site."""
    upstream: list[str] = []
    for name, _site, _w in blocks:
        if name == SELF:
            continue
        site = check_sae_site(model, name, regressor_saes[name])
        if site_order(site) >= site_order(target):
            raise HookSiteError(
                f"Regressor {name!r} reads {site.name}, which does not run before the target site "
                f"{target.name}; a splice at the target needs its regressors computed earlier in the pass."
            )
        if site.name not in upstream:
            upstream.append(site.name)
    return upstream


def _joint_unit(
    target: Site,
    target_sae: SAE,
    regressor_saes: Mapping[str, SAE],
    joint_map: JointMap,
    upstream: list[str],
    probe: tuple[Tensor, Tensor] | None,
    fvu: dict[str, FVU],
    device: torch.device,
    dtype: torch.dtype | None,
) -> SpliceUnit:
    """The splice unit of x̂' and its exactness check; ``observe`` feeds the scored rows to ``fvu``. The
    SAEs (in ``dtype``, None: their own), the map and the probe go to ``device``."""
    target_sae = on_device(target_sae, device, dtype)
    regressor_saes = {n: on_device(s, device, dtype) for n, s in regressor_saes.items()}
    blocks = joint_map.blocks
    w_j, b_j = joint_map.weights.to(device), joint_map.bias.to(device)
    probe = None if probe is None else probe_on(probe, device)

    def compute(x: Tensor, ups: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        xf = x.float()
        sae_x = sae_recon(target_sae, x)
        z = regressors(blocks, sae_x, ups, regressor_saes)
        x_joint = sae_x + torch.addmm(b_j.to(z), z, w_j.to(z))
        reps = {
            "sae": sae_x,
            "sae+joint": x_joint,
            "sae+joint+rest": x_joint + (xf - x_joint),
            "zero": torch.zeros_like(xf),
        }
        extras = {"sae": sae_x, "sae+joint": x_joint}
        if probe is not None:
            lin = torch.addmm(probe[1].to(xf), xf, probe[0].to(xf))
            reps["sae+linear"] = extras["sae+linear"] = sae_x + lin
        return reps, extras

    def observe(x: Tensor, extras: Mapping[str, Tensor]) -> None:
        for k, v in extras.items():
            fvu[k].update(x.float(), v)

    return SpliceUnit("joint", target, compute, upstream=tuple(upstream), observe=observe)


def _ce_ratios(ce: Mapping[str, float], *, with_probe: bool) -> dict[str, float | None]:
    """CE recovered by x̂' (and by the linear probe, with one) and the CE loss scores of Sae and x̂'."""
    gap = ce["sae"] - ce["clean"]
    return {
        "ce_recovered_joint": ratio(ce["sae"] - ce["sae+joint"], gap),
        "ce_recovered_linear": ratio(ce["sae"] - ce["sae+linear"], gap) if with_probe else None,
        "ce_loss_score": ratio(ce["zero"] - ce["sae"], ce["zero"] - ce["clean"]),
        "ce_loss_score_joint": ratio(ce["zero"] - ce["sae+joint"], ce["zero"] - ce["clean"]),
    }


def _joint_config(
    lm: Any,
    model: torch.nn.Module,
    arr: np.ndarray,
    target_sae: SAE,
    regressor_saes: Mapping[str, SAE],
    joint_map: JointMap,
    blocks: Any,
) -> dict[str, Any]:
    """What the joint-map CE depends on besides its options (for its config hash)."""
    w_j, b_j = joint_map.weights, joint_map.bias
    return {
        "model": model_identity(lm, model),
        "contexts": {"n": int(arr.shape[0]), "ctx_len": int(arr.shape[1])},
        "target": sae_identity(target_sae),
        "regressors": {n: sae_identity(s) for n, s in regressor_saes.items()},
        "blocks": blocks,
        "joint_sha": stable_hash([float(w_j.double().sum()), float(b_j.double().sum())]),
    }


def downstream_ce_with_joint(
    lm: Any,
    tokens: np.ndarray,
    target_sae: SAE,
    regressor_saes: Mapping[str, SAE],
    joint_map: JointMap,
    *,
    start: int,
    batch_size: int = 4,
    probe: tuple[Tensor, Tensor] | None = None,
    prefix_cache: bool = True,
    both_tolerance: float = 1e-3,
    seed: int = 0,
    progress: Progress | None = None,
    dtype: torch.dtype | None = None,
    ranks: Ranks = SINGLE,
) -> JointCEResult:
    """Mean CE on held-out contexts of splicing x̂' at the target site for positions ``>= start``.

    The regressor sites must run before the target site in the forward pass (layer L−1 resid_post, layer L
    attn_out and mlp_out all precede layer L resid_post); a splice at the target leaves them unchanged.
    Without ``prefix_cache`` each spliced pass captures them live in the same forward and the splice hook
    at the target reads them; with it (the default) they come from the batch's clean pass, which holds
    the same values, and the unchanged layers are replayed (the splice engine). Settings: ``sae``,
    ``sae+joint`` (x̂'), ``sae+joint+rest`` (x̂' + (x − x̂') = x, the exactness check), ``zero``, and
    ``sae+linear`` when the target's ``probe`` is given, for comparison with the linear probe. Everything
    runs on the model's device: the SAEs (in ``dtype``, None: their own), the joint map and the probe go
    there. ``ranks``: each rank splices its share of whole batches, as in ``downstream_ce``.
    """
    t0 = time.perf_counter()
    model = model_of(lm)
    arr = check_tokens(tokens, model, start)
    target = check_sae_site(model, "target", target_sae)
    blocks = check_joint_map(joint_map, target_sae, regressor_saes)
    d = model_width(model)
    upstream = _upstream_sites(model, target, blocks, regressor_saes)
    pr = None if probe is None else check_probe("target", probe, d)
    fvu = {k: FVU(d) for k in ("sae", "sae+joint", "sae+linear")}
    unit = _joint_unit(
        target, target_sae, regressor_saes, joint_map, upstream, pr, fvu, model_device(model), dtype
    )
    out = run_splices(
        model,
        arr,
        [unit],
        start=start,
        batch_size=batch_size,
        prefix_cache=prefix_cache,
        progress=progress,
        batches=rank_batches(len(arr), batch_size, ranks),
    )
    out, fvu = gather_splices(ranks, out, fvu, fvu_on_cpu)
    tally, clean = out.tallies["joint"], out.clean_ce_sum / out.n_scored
    ce = {"clean": clean} | {k: tally.mean("ce", k) for k in tally.ce}
    kl = {k: tally.mean("kl", k) for k in tally.kl}
    both = check_both("joint", ce["sae+joint+rest"], tally.mean("clean", "sae+joint+rest"), both_tolerance)
    config = _joint_config(lm, model, arr, target_sae, regressor_saes, joint_map, blocks)
    config |= {"start": int(start), "batch_size": batch_size, "prefix_cache": prefix_cache}
    return JointCEResult(
        config_hash=stable_hash(config),
        seed=seed,
        config=config,
        target_site=target.name,
        blocks=blocks,
        n_contexts=int(arr.shape[0]),
        ctx_len=int(arr.shape[1]),
        start=int(start),
        scored_tokens=out.n_scored,
        ce=ce,
        kl=kl,
        **_ce_ratios(ce, with_probe=pr is not None),  # type: ignore[arg-type]
        both_max_abs_ce_diff=tally.max_abs_ce_diff["sae+joint+rest"],
        both_mean_ce_diff=both,
        fvu_sae=fvu["sae"].compute(),
        fvu_sae_joint=fvu["sae+joint"].compute(),
        fvu_sae_linear=fvu["sae+linear"].compute() if pr is not None else None,
        prefix_cache=prefix_cache,
        forward_passes=out.forward_passes,
        seconds=time.perf_counter() - t0,
    )
