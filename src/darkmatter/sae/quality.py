"""Reconstruction quality of SAEs on one split of the store: FVU, nMSE, L0 and dead latents."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from darkmatter.errors import ShapeError
from darkmatter.sae.model import SAE
from darkmatter.stats.metrics import FVU, L0, NMSE
from darkmatter.stats.split import is_train
from darkmatter.store import ActivationStore


@torch.no_grad()
def evaluate_saes(
    store: ActivationStore,
    saes: Mapping[str, SAE],
    *,
    split: str = "test",
    split_seed: int = 0,
    train_fraction: float = 0.8,
    batch_tokens: int = 4096,
    device: str = "cpu",
) -> dict[str, dict[str, float]]:
    """One streaming pass over the store; every SAE is evaluated on the same tokens of ``split``."""
    sites = sorted({s.cfg.hook_site or "" for s in saes.values()})
    for name, sae in saes.items():
        site = sae.cfg.hook_site
        if site not in store.sites:
            raise ShapeError(f"SAE {name!r} reads {site!r}, which the store lacks ({store.sites}).")
        sae.check_input_width(store.d[site], site)
    fvu = {n: FVU(s.cfg.d_in) for n, s in saes.items()}
    nmse = {n: NMSE(s.cfg.d_in) for n, s in saes.items()}
    l0 = {n: L0(s.cfg.d_sae) for n, s in saes.items()}
    for batch in store.iter_batches(sites, batch_tokens=batch_tokens, device=device):
        train = is_train(batch.context.cpu(), batch.position.cpu(), split_seed, train_fraction).to(
            batch.context.device
        )
        keep = train if split == "train" else ~train
        if not bool(keep.any()):
            continue
        for name, sae in saes.items():
            x = batch.acts[sae.cfg.hook_site or ""][keep].to(sae.dtype)
            x_hat, codes = sae.reconstruct(x)
            fvu[name].update(x, x_hat)
            nmse[name].update(x, x_hat)
            l0[name].update_sparse(codes.indices, codes.values)
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
