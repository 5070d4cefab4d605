"""What both engine passes share: the SAEs grouped by site, the split, the batching and the progress."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from darkmatter.errors import DataError, StoreError
from darkmatter.experiments.decomposition.accumulators import block_of, n_blocks
from darkmatter.heap import HeapReleaser
from darkmatter.progress import Progress, Ticker
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.sae.model import SAE
from darkmatter.stats import Moments
from darkmatter.stats.split import Split
from darkmatter.store import ActivationStore, Batch

Tensor = torch.Tensor

RECONSTRUCT_CHUNK = 1024
"""Tokens per SAE encode inside a batch: keeps the [tokens, d_sae] pre-activations small and reused."""


def group_by_site(saes: Mapping[str, SAE], store: ActivationStore) -> dict[str, list[str]]:
    """Site -> names of the SAEs that read it; every SAE's site and width checked against the store."""
    groups: dict[str, list[str]] = {}
    for name, sae in saes.items():
        site = sae.cfg.hook_site
        if site is None or site not in store.sites:
            raise StoreError(
                f"SAE {name!r} reads site {site!r}, which the store lacks (it has {store.sites})."
            )
        sae.check_input_width(store.d[site], site)
        groups.setdefault(site, []).append(name)
    return groups


@dataclass
class EnginePlan:
    """The store, the SAEs by site, the split, the batch size, the device and the shared progress."""

    store: ActivationStore
    saes: Mapping[str, SAE]
    split: Split
    batch_tokens: int
    device: str
    contexts: np.ndarray | None
    passes: int
    progress: Progress | None = None
    interval_site: str | None = None
    interval_blocks: int = 8
    ranks: Ranks = SINGLE
    groups: dict[str, list[str]] = field(init=False)
    shards: list[int] | None = field(init=False)  # this rank's shards (None: every shard)
    width: dict[str, int] = field(init=False)  # site -> d
    tokens_per_pass: int = field(init=False)
    ticker: Ticker = field(init=False)
    heap: HeapReleaser = field(init=False)

    def __post_init__(self) -> None:
        if not self.saes:
            raise DataError("decompose needs at least one SAE.")
        self.groups = group_by_site(self.saes, self.store)
        self.width = {site: self.store.d[site] for site in self.groups}
        self.shards = self.ranks.share(range(self.store.n_shards)) if self.ranks.active else None
        chosen = (
            np.arange(self.store.n_contexts)
            if self.contexts is None
            else np.unique(np.asarray(self.contexts, dtype=np.int64))
        )
        if self.shards is not None:
            chosen = np.intersect1d(chosen, self.store.shard_contexts_of(self.shards))
        n_ctx = len(chosen)
        self.tokens_per_pass = n_ctx * (
            self.store.ctx_len - int(self.store.identity.get("skip_positions", 0))
        )
        self.ticker = Ticker(self.progress, self.tokens_per_pass * self.passes)
        self.heap = HeapReleaser()  # freed batch temporaries would otherwise fragment and grow the heap
        if self.interval_site is not None and self.interval_site not in self.groups:
            raise DataError(
                f"interval_site {self.interval_site!r} is not a site of the SAEs ({list(self.groups)})."
            )

    def blocks(self, site: str) -> int:
        """Blocks of contexts the moments of ``site`` are kept in (one but at the interval site)."""
        return n_blocks(self.store, self.interval_blocks) if site == self.interval_site else 1

    def block_of(self, site: str, context: int) -> int:
        """The block of a context at ``site``: whole shards, in order, so a batch never spans two."""
        return block_of(self.store, self.blocks(site), context)

    def batches(self) -> Iterator[Batch]:
        """One pass over the store (or its chosen contexts), every site of the family per batch."""
        yield from self.store.iter_batches(
            list(self.groups),
            batch_tokens=self.batch_tokens,
            device=self.device,
            contexts=self.contexts,
            shards=self.shards,
        )

    def batch_done(self, n_tokens: int) -> None:
        self.heap.tick(n_tokens)
        self.ticker.advance(n_tokens)

    def packed_storage(self, moments: dict[tuple[str, str], Moments]) -> dict[str, Tensor]:
        """A float64 packed buffer per site, reused by every batch of a pass (no pages faulted per batch)."""
        rows = max(1, min(self.batch_tokens, self.tokens_per_pass))
        return {
            site: torch.empty(
                rows, moments[(site, "train")].packed_width, dtype=torch.float64, device=self.device
            )
            for site in self.groups
        }
