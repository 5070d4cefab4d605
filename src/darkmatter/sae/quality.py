"""Reconstruction quality of SAEs on one part of the store's train/test split: FVU, nMSE, L0, dead latents."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from darkmatter.errors import ShapeError
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.sae.model import SAE
from darkmatter.stats.metrics import FVU, L0, NMSE
from darkmatter.stats.split import Split
from darkmatter.store import ActivationStore


@torch.no_grad()
def evaluate_saes(
    store: ActivationStore,
    saes: Mapping[str, SAE],
    *,
    split: Split,
    part: Literal["train", "test"] = "test",
    batch_tokens: int = 4096,
    device: str = "cpu",
    ranks: Ranks = SINGLE,
) -> dict[str, dict[str, float]]:
    """One streaming pass over the store; every SAE is evaluated on the same tokens of ``part``.

    ``ranks``: under ``torchrun`` every rank (each must call this with the same SAEs) passes over its share
    of the shards and the sums meet; every rank returns the numbers of the whole store."""
    sites = sorted({s.cfg.hook_site or "" for s in saes.values()})
    for name, sae in saes.items():
        site = sae.cfg.hook_site
        if site not in store.sites:
            raise ShapeError(f"SAE {name!r} reads {site!r}, which the store lacks ({store.sites}).")
        sae.check_input_width(store.d[site], site)
    fvu = {n: FVU(s.cfg.d_in) for n, s in saes.items()}
    nmse = {n: NMSE(s.cfg.d_in) for n, s in saes.items()}
    l0 = {n: L0(s.cfg.d_sae) for n, s in saes.items()}
    shards = ranks.share(range(store.n_shards)) if ranks.active else None
    for batch in store.iter_batches(sites, batch_tokens=batch_tokens, device=device, shards=shards):
        train = split.mask(batch.context.cpu(), batch.position.cpu()).to(batch.context.device)
        keep = train if part == "train" else ~train
        if not bool(keep.any()):
            continue
        for name, sae in saes.items():
            x = batch.acts[sae.cfg.hook_site or ""][keep].to(sae.dtype)
            x_hat, codes = sae.reconstruct(x)
            fvu[name].update(x, x_hat)
            nmse[name].update(x, x_hat)
            l0[name].update_sparse(codes.indices, codes.values)
    if ranks.active:
        for n in saes:  # the same order on every rank
            fvu[n].all_reduce_()
            nmse[n].all_reduce_()
            l0[n].all_reduce_()
    return {
        n: {
            "fvu": fvu[n].compute(),
            "nmse": nmse[n].compute(),
            "l0": l0[n].compute(),
            "dead_fraction": l0[n].dead_fraction(),
            "tokens": float(fvu[n].n),
        }
        for n in saes
    }
