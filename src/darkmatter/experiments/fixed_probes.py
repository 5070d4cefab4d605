"""FVU and FVU_nonlinear of SAEs on chosen test tokens with error probes fitted elsewhere.

Gradient pursuit reconstructs only a few contexts (it is costly); refitting a probe on those contexts
overfits it (hundreds of coefficients per output from a few thousand tokens). Applying the engine's probe,
fitted on the whole train split, keeps FVU_nonlinear comparable with the engine's numbers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from darkmatter.errors import DataError
from darkmatter.experiments.decomposition import RECONSTRUCT_CHUNK, Probe
from darkmatter.experiments.inputs import on_device
from darkmatter.progress import Progress, Ticker
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.sae.model import SAE
from darkmatter.stats.split import Split
from darkmatter.store import ActivationStore


@dataclass
class HeldOutFit:
    """One SAE on the chosen test tokens: FVU, FVU with its probe's prediction added, and mean L0."""

    fvu: float
    fvu_nonlinear: float
    l0: float


@torch.no_grad()
def fvu_with_probes(
    store: ActivationStore,
    saes: Mapping[str, SAE],
    probes: Mapping[str, Probe],
    *,
    split: Split,
    contexts: np.ndarray | None = None,
    batch_tokens: int = 1024,
    progress: Progress | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    ranks: Ranks = SINGLE,
) -> tuple[dict[str, HeldOutFit], int]:
    """Per SAE, FVU(x, x̂) and FVU(x, x̂ + x W + b) with ``probes[name] = (W, b)``, on test tokens of
    ``contexts`` (all when None); returns them and the number of test tokens. One pass over the store, on
    ``device``: the SAEs (in ``dtype``, None: their own), the probes, the batches and the float64 sums.
    ``ranks``: under ``torchrun`` every rank (each must call this) passes over its share of the shards and
    the float64 sums are added across ranks; every rank returns the same numbers."""
    sites = sorted({str(s.cfg.hook_site) for s in saes.values()})
    if len(sites) != 1:
        raise DataError(f"fvu_with_probes needs SAEs of one site, found {sites}.")
    site = sites[0]
    d = store.d[site]
    dev = torch.device(device)
    saes = {name: on_device(sae, dev, dtype) for name, sae in saes.items()}
    probes = {name: (w.to(dev), b.to(dev)) for name, (w, b) in probes.items() if name in saes}
    sum_x = torch.zeros(d, dtype=torch.float64, device=dev)
    sum_sq = n = 0.0
    sse = {name: [0.0, 0.0, 0.0] for name in saes}  # Σ‖x − x̂‖², Σ‖x − x̂ − Wx − b‖², Σ L0
    shards = ranks.share(range(store.n_shards)) if ranks.active else None
    chosen = np.arange(store.n_contexts) if contexts is None else np.unique(contexts)
    if shards is not None:
        chosen = np.intersect1d(chosen, store.shard_contexts_of(shards))
    ticker = Ticker(progress, len(chosen) * (store.ctx_len - int(store.identity.get("skip_positions", 0))))
    batches = store.iter_batches(
        [site], batch_tokens=batch_tokens, contexts=contexts, device=dev, shards=shards
    )
    for batch in batches:
        ticker.advance(len(batch))
        test = ~split.mask(batch.context, batch.position)
        x = batch.acts[site][test]
        if len(x) == 0:
            continue
        sum_x += x.double().sum(0)
        sum_sq += float(x.double().pow(2).sum())
        n += len(x)
        for name, sae in saes.items():
            x_hat, codes = sae.reconstruct(x.to(sae.dtype), chunk_size=RECONSTRUCT_CHUNK)
            err = x - x_hat.to(x.dtype)
            weights, bias = probes[name]
            rest = err - torch.addmm(bias.to(x.dtype), x, weights.to(x.dtype))
            sse[name][0] += float(err.double().pow(2).sum())
            sse[name][1] += float(rest.double().pow(2).sum())
            sse[name][2] += float((codes.values != 0).sum())
    if ranks.active:
        sum_x, sum_sq, n = _summed(ranks, sum_x, sum_sq, n, sse)
    if n < 2:
        raise DataError(f"The chosen contexts hold {int(n)} test tokens; FVU needs at least 2.")
    var_x = sum_sq - float(sum_x.pow(2).sum()) / n
    if not var_x > 0:
        raise DataError(f"x at {site} is constant over the {int(n)} test tokens; FVU is undefined.")
    fits = {name: HeldOutFit(e / var_x, nl / var_x, l0 / n) for name, (e, nl, l0) in sse.items()}
    return fits, int(n)


def _summed(
    ranks: Ranks, sum_x: torch.Tensor, sum_sq: float, n: float, sse: dict[str, list[float]]
) -> tuple[torch.Tensor, float, float]:
    """Every rank's sums added (in float64, one collective): Σx, Σ‖x‖², the token count (returned) and the
    per-SAE sums (in place)."""
    scalars = [sum_sq, n, *(v for name in sorted(sse) for v in sse[name])]
    packed = torch.cat([sum_x.cpu(), torch.tensor(scalars, dtype=torch.float64)])
    ranks.sum_([packed])
    values = packed
    d = len(sum_x)
    for i, name in enumerate(sorted(sse)):
        sse[name] = [float(v) for v in values[d + 2 + 3 * i : d + 5 + 3 * i]]
    return values[:d].to(sum_x.device), float(values[d]), float(values[d + 1])
