"""One forward pass per batch harvests several sites into the activation store.

The pass stops after the last needed layer unless per-token model loss is requested (which needs the
logits). Shards are computed and written one at a time (the write of shard i overlaps the compute of
shard i+1), so memory is bounded by two shards whatever the corpus size. A harvest killed at any point
and started again recomputes only the shards the manifest does not list; shard content depends only on
its contexts, so the finished store is identical to an uninterrupted one.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from darkmatter.errors import ConfigError, DataError, HookSiteError, StoreError
from darkmatter.lm.hooks import capture, run
from darkmatter.lm.loading import LoadedLM
from darkmatter.lm.sites import parse_site, validate_sites
from darkmatter.progress import Progress
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.store import STORE_DTYPES, ActivationStore, identity_hash
from darkmatter.text import Contexts, TextConfig


class HarvestConfig(BaseModel):
    """What to record from the model and how to write it."""

    model_config = ConfigDict(extra="forbid")

    sites: list[str] = Field(
        default_factory=list, description="Extra hook sites; the study adds the sites its SAE family reads."
    )

    @field_validator("sites")
    @classmethod
    def _known_sites(cls, sites: list[str]) -> list[str]:
        for site in sites:
            try:
                parse_site(site)
            except HookSiteError as exc:
                raise ValueError(str(exc)) from None
        return sites

    dtype: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="Storage dtype: fp32, bf16 or fp16.")
    with_loss: bool = Field(True, description="Record per-token next-token loss (needs the full forward).")
    batch_size: int = Field(8, ge=1, description="Contexts per forward pass.")
    shard_contexts: int = Field(64, ge=1, description="Contexts per shard file.")


def store_identity(lm: LoadedLM, text: TextConfig, cfg: HarvestConfig, contexts: Contexts) -> dict[str, Any]:
    """Everything that determines the store's bytes; a store with another identity is never reused."""
    if cfg.dtype not in STORE_DTYPES:
        raise ConfigError(f"Unknown store dtype {cfg.dtype!r}; use one of {', '.join(STORE_DTYPES)}.")
    sites = [s.name for s in validate_sites(lm.model, cfg.sites)]
    d_model = lm.identity["d_model"]
    return {
        "model": lm.identity,
        "sites": sites,
        "d": dict.fromkeys(sites, d_model),
        "dtype": cfg.dtype,
        "ctx_len": int(contexts.tokens.shape[1]),
        "n_contexts": int(contexts.tokens.shape[0]),
        "tokens_fingerprint": contexts.fingerprint,
        "has_bos": contexts.has_bos,
        "skip_positions": text.skip_positions,
        "text_source": text.source,
        "with_loss": cfg.with_loss,
        "shard_contexts": cfg.shard_contexts,
        "batch_size": cfg.batch_size,
    }


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[batch, seq]`` float32 CE of predicting token t+1 at position t; NaN at the last position."""
    b, t, v = logits.shape
    loss = torch.full((b, t), float("nan"), dtype=torch.float32, device=logits.device)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), tokens[:, 1:].reshape(-1), reduction="none")
    loss[:, :-1] = ce.view(b, t - 1)
    return loss


@torch.no_grad()
def forward_shard(
    lm: LoadedLM, tokens: np.ndarray, sites: list[str], cfg: HarvestConfig
) -> dict[str, torch.Tensor]:
    """Run the model over a shard's contexts and return the tensors to store."""
    model = lm.model
    device = next(model.parameters()).device
    out_dtype = STORE_DTYPES[cfg.dtype]
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    losses: list[torch.Tensor] = []
    for a in range(0, len(tokens), cfg.batch_size):
        ids = torch.as_tensor(tokens[a : a + cfg.batch_size].astype(np.int64), device=device)
        with capture(model, sites, stop_early=not cfg.with_loss) as cap:
            out = run(model, input_ids=ids, use_cache=False)
        for s in sites:
            act = cap.acts[s]
            if not torch.isfinite(act).all():
                raise DataError(
                    f"The model produced NaN or inf activations at {s}; try dtype fp32 or another model."
                )
            parts[s].append(act.to("cpu", out_dtype))
        if cfg.with_loss:
            losses.append(next_token_loss(out.logits, ids).cpu())
    result = {s: torch.cat(parts[s]) for s in sites}
    if cfg.with_loss:
        result["loss"] = torch.cat(losses)
    return result


def harvest(
    lm: LoadedLM,
    contexts: Contexts,
    text: TextConfig,
    cfg: HarvestConfig,
    out_dir: str,
    *,
    progress: Progress | None = None,
    ranks: Ranks = SINGLE,
) -> ActivationStore:
    """Harvest ``cfg.sites`` for all contexts into a store at ``out_dir`` (resuming if it exists).

    ``ranks``: under ``torchrun``, rank 0 creates (or resumes) the store, each rank harvests its
    contiguous share of the shards still to do and records them, and rank 0 folds the records into the
    manifest: the store equals a one-process store byte for byte.
    """
    identity = store_identity(lm, text, cfg, contexts)
    store = ActivationStore.create_or_resume(out_dir, identity, contexts.tokens) if ranks.leader else None
    ranks.barrier()
    if store is None:
        store = _joined(out_dir, identity)
    todo = ranks.share([i for i in range(store.n_shards) if i not in store.done_shards()])
    total = store.n_contexts * store.ctx_len
    done_tokens = (store.n_shards - len(todo)) * store.shard_contexts * store.ctx_len
    t0 = time.perf_counter()
    new_tokens = 0
    pending: Future[None] | None = None
    with ThreadPoolExecutor(max_workers=1) as writer:
        for index in todo:
            start, stop = store.shard_range(index)
            tensors = forward_shard(lm, contexts.tokens[start:stop], identity["sites"], cfg)
            if pending is not None:
                pending.result()
            pending = writer.submit(
                store.write_shard, index, tensors, rank=ranks.rank if ranks.active else None
            )
            new_tokens += (stop - start) * store.ctx_len
            if progress is not None:
                elapsed = time.perf_counter() - t0
                progress(min(done_tokens + new_tokens, total), total, new_tokens / max(elapsed, 1e-9))
        if pending is not None:
            pending.result()
    if not ranks.active:
        return store
    ranks.barrier()
    if ranks.leader:
        store.adopt_rank_records()
    ranks.barrier()
    return store if ranks.leader else _joined(out_dir, identity)


def _joined(out_dir: str, identity: dict[str, Any]) -> ActivationStore:
    """The store rank 0 created, opened by another rank (which must agree on its identity)."""
    store = ActivationStore.open(out_dir)
    if store.manifest["identity_hash"] != identity_hash(identity):
        raise StoreError(
            f"{out_dir}: this rank's store identity differs from rank 0's (another model or text?)."
        )
    return store
