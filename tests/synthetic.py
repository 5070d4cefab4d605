"""Synthetic activation stores for tests: planted sparse features written through the real store API."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from darkmatter.store import ActivationStore

Generator = Callable[[torch.Generator, int, int], dict[str, torch.Tensor]]


def sparse_features(d: int = 16, n_features: int = 64, active: int = 3, seed: int = 0) -> Generator:
    """Activations that are sparse non-negative sums of ``n_features`` random unit directions plus noise."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=g) * 2

    def make(gen: torch.Generator, n_ctx: int, ctx_len: int) -> dict[str, torch.Tensor]:
        n = n_ctx * ctx_len
        idx = torch.stack([torch.randperm(n_features, generator=gen)[:active] for _ in range(n)])
        mags = torch.rand(n, active, generator=gen) * 3 + 0.5
        x = torch.zeros(n, d).index_add_(
            0, torch.arange(n).repeat_interleave(active), (mags.reshape(-1, 1) * dirs[idx.reshape(-1)])
        )
        x += offset + 0.01 * torch.randn(n, d, generator=gen)
        return {"blocks.0.hook_resid_post": x.reshape(n_ctx, ctx_len, d)}

    return make


def synthetic_store(
    path: Path,
    make: Generator,
    *,
    n_contexts: int = 40,
    ctx_len: int = 32,
    shard_contexts: int = 8,
    skip_positions: int = 0,
    seed: int = 0,
    with_loss: bool = False,
) -> ActivationStore:
    """A complete store whose shards hold ``make``'s tensors (sites inferred from its keys)."""
    gen = torch.Generator().manual_seed(seed)
    first = make(gen, 1, ctx_len)
    sites = sorted(first)
    identity = {
        "model": {"name": "synthetic", "model_type": "none", "n_layers": 0, "d_model": 0},
        "sites": sites,
        "d": {s: int(first[s].shape[-1]) for s in sites},
        "dtype": "fp32",
        "ctx_len": ctx_len,
        "n_contexts": n_contexts,
        "tokens_fingerprint": f"synthetic-{seed}",
        "has_bos": False,
        "skip_positions": skip_positions,
        "text_source": "synthetic",
        "with_loss": with_loss,
        "shard_contexts": shard_contexts,
        "batch_size": 1,
    }
    tokens = np.random.default_rng(seed).integers(0, 100, size=(n_contexts, ctx_len)).astype(np.int32)
    store = ActivationStore.create_or_resume(path, identity, tokens)
    for index in range(store.n_shards):
        start, stop = store.shard_range(index)
        tensors = {s: v.float().contiguous() for s, v in make(gen, stop - start, ctx_len).items()}
        if with_loss:
            tensors["loss"] = torch.rand(stop - start, ctx_len, generator=gen)
        store.write_shard(index, tensors)
    return store
