"""Fig 14: the probe from s = Σ f_i d_i to ‖s‖², dotted with each unit decoder direction, against
E[w²]/E[w] of that latent's (decoder-norm scaled) activation when active (App. C.1).

s is the decoder's sum over active latents in the SAE's own space (no ``b_dec``, before any input scaling
or normalization is undone), so the result is the same for an SAE and its equivalent rewrites (an input
scale folded in or not, a layer-norm input or not)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from darkmatter.errors import DataError
from darkmatter.experiments.inputs import on_device, placement
from darkmatter.sae.model import SAE
from darkmatter.stats import Moments, evaluate, fit_ridge
from darkmatter.stats.split import Split
from darkmatter.store import ActivationStore


def latent_sum(sae: SAE, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ f_i d_i ``[n, d_in]`` of sparse codes ``[n, m]``: the decoder's output before ``b_dec``."""
    weights = values.to(dtype=sae.dtype)
    if indices.shape[-1] == 0:
        return torch.zeros(indices.shape[0], sae.cfg.d_in, dtype=sae.dtype, device=sae.device)
    return F.embedding_bag(indices.long(), sae.W_dec, per_sample_weights=weights, mode="sum")


@torch.no_grad()
def probe_latents(
    store: ActivationStore,
    sae: SAE,
    *,
    split: Split,
    batch_tokens: int = 4096,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Fit the norm probe on train tokens (R² on test tokens); latent statistics from train tokens.

    Everything is computed on ``device`` (None: the SAE's) with the SAE in ``dtype`` (None: its own); the
    float64 sums stay there and only the final numbers come back to the host."""
    dev = placement(device, sae)
    sae = on_device(sae, dev, dtype)
    site = str(sae.cfg.hook_site)
    d, w = sae.cfg.d_in, sae.cfg.d_sae
    mom = {p: Moments(d, {"s2": 1}, device=dev) for p in ("train", "test")}
    sum_w = torch.zeros(w, dtype=torch.float64, device=dev)
    sum_w2 = torch.zeros(w, dtype=torch.float64, device=dev)
    count = torch.zeros(w, dtype=torch.float64, device=dev)
    dec_norm = sae.W_dec.detach().double().norm(dim=1)
    for batch in store.iter_batches([site], batch_tokens=batch_tokens, device=dev):
        x = batch.acts[site].to(sae.dtype)
        codes = sae.encode_sparse(x)
        s = latent_sum(sae, codes.indices, codes.values).float()
        train = split.mask(batch.context, batch.position)
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
    dots = (unit @ a.to(dev)).cpu().numpy()
    alive = (count > 0).cpu().numpy()
    if alive.sum() < 3:
        raise DataError(f"Fewer than 3 latents of the SAE at {site} fire on the train split; cannot compare.")
    mean = (sum_w / count.clamp_min(1)).cpu().numpy()
    ratio = (sum_w2 / count.clamp_min(1)).cpu().numpy() / np.maximum(mean, 1e-12)
    return {
        "probe_r2": float(r2),
        "correlation": float(np.corrcoef(dots[alive], ratio[alive])[0, 1]),
        "correlation_mean": float(np.corrcoef(dots[alive], mean[alive])[0, 1]),
        "n_latents": int(alive.sum()),
        "probe_dot": dots[alive].astype(float).tolist(),
        "mean_active": ratio[alive].astype(float).tolist(),
    }
