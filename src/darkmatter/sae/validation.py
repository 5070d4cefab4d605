"""The trainer's validation set: a fixed, deterministic sample of held-out (test-split) tokens.

Which tokens: the test-split tokens of contexts spread evenly over the store, read from at most
``MAX_SHARDS`` evenly spaced shards at first (more only when those hold too few), in store order, capped at
``n_tokens``. The SAEs never train on them (they are test tokens); the family's held-out quality is measured
on all test tokens, of which these are a subset. They are read once into memory: ``n_tokens`` rows per input,
whatever the store's size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from darkmatter.sae.model import SAE
from darkmatter.stats.metrics import FVU
from darkmatter.stats.split import Split
from darkmatter.store import ActivationStore

Tensor = torch.Tensor
MAX_SHARDS = 8
EVAL_CHUNK = 4096  # rows per SAE forward pass


def _test_counts(store: ActivationStore, split: Split, contexts: np.ndarray) -> np.ndarray:
    """Test-split tokens of each of ``contexts`` (after the store's skipped positions)."""
    skip = int(store.identity.get("skip_positions", 0))
    pos = torch.arange(skip, store.ctx_len)
    ctx = torch.as_tensor(contexts, dtype=torch.long)
    grid_c = ctx.repeat_interleave(len(pos))
    grid_p = pos.repeat(len(ctx))
    test = ~split.mask(grid_c, grid_p)
    return test.reshape(len(ctx), len(pos)).sum(1).numpy()


def _spread(n: int, m: int) -> np.ndarray:
    """``m`` indices spread evenly over ``range(n)`` (distinct for m ≤ n)."""
    return np.floor(np.arange(m) * (n / m)).astype(np.int64)


def validation_contexts(store: ActivationStore, split: Split, n_tokens: int) -> np.ndarray:
    """The contexts whose test tokens form the validation set (sorted; enough for ``n_tokens`` if the
    store has that many test tokens)."""
    if n_tokens <= 0:
        return np.zeros(0, dtype=np.int64)
    n_sh = min(MAX_SHARDS, store.n_shards)
    while True:
        shards = _spread(store.n_shards, n_sh)
        cands = np.concatenate([np.arange(*store.shard_range(int(s))) for s in shards])
        counts = _test_counts(store, split, cands)
        if counts.sum() >= n_tokens or n_sh == store.n_shards:
            break
        n_sh = min(store.n_shards, 2 * n_sh)
    mean = max(float(counts.mean()), 1e-9)
    m = min(len(cands), max(1, int(np.ceil(n_tokens / mean))))
    while counts[_spread(len(cands), m)].sum() < n_tokens and m < len(cands):
        m = min(len(cands), m + max(1, m // 16))
    return np.sort(cands[_spread(len(cands), m)])


def load_validation(
    store: ActivationStore,
    split: Split,
    sites: list[str],
    n_tokens: int,
    *,
    device: str | torch.device = "cpu",
) -> dict[str, Tensor]:
    """Float32 rows ``[≤ n_tokens, d]`` on ``device`` of each stored site on the validation tokens (same
    rows for all)."""
    contexts = validation_contexts(store, split, n_tokens)
    parts: dict[str, list[Tensor]] = {s: [] for s in sites}
    have = 0
    if len(contexts):
        for b in store.iter_batches(sites, contexts=contexts, batch_tokens=4096, device=device):
            keep = ~split.mask(b.context, b.position)
            take = int(min(int(keep.sum()), n_tokens - have))
            rows = torch.nonzero(keep).flatten()[:take]
            for s in sites:
                parts[s].append(b.acts[s][rows].float())
            have += take
            if have >= n_tokens:
                break
    return {
        s: torch.cat(v) if v else torch.zeros(0, store.d[s], dtype=torch.float32, device=device)
        for s, v in parts.items()
    }


class ValidationSet:
    """Inputs (stored sites or derived inputs) on the validation tokens, and the FVU of an SAE on them."""

    def __init__(self, inputs: Mapping[str, Tensor]) -> None:
        self.inputs = dict(inputs)
        self.n_tokens = min((len(v) for v in self.inputs.values()), default=0)

    @classmethod
    def build(
        cls,
        store: ActivationStore,
        split: Split,
        inputs: list[str],
        n_tokens: int,
        *,
        source: Callable[[str], str],
        derive: Callable[[str, Tensor], Tensor],
        device: str | torch.device = "cpu",
    ) -> ValidationSet:
        """``source(name)`` is the stored site an input reads; ``derive(name, rows)`` computes a derived one
        (it is only called for inputs whose source differs from their name). The rows are on ``device``."""
        stored = sorted({source(n) for n in inputs})
        loaded = load_validation(store, split, stored, n_tokens, device=device)
        return cls({n: loaded[n] if source(n) == n else derive(n, loaded[source(n)]) for n in inputs})

    @torch.no_grad()
    def fvu(self, sae: SAE, input_name: str) -> float | None:
        """Σ‖x − x̂‖² / Σ‖x − x̄‖² over the validation tokens (None when there are fewer than two)."""
        x_all = self.inputs[input_name]
        if len(x_all) < 2:
            return None
        metric = FVU(x_all.shape[1])
        for i in range(0, len(x_all), EVAL_CHUNK):
            x = x_all[i : i + EVAL_CHUNK].to(sae.device, sae.dtype)
            x_hat, _ = sae.reconstruct(x)
            metric.update(x, x_hat)
        return metric.compute()
