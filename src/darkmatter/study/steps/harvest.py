"""Harvest: the configured sites of the model on the study's contexts, into the activation store."""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, Field

from darkmatter.config.schema import StudyConfig
from darkmatter.harvest import harvest
from darkmatter.results import Result
from darkmatter.store import MANIFEST, ActivationStore
from darkmatter.study.context import StudyContext
from darkmatter.study.step import Step
from darkmatter.text import make_contexts


class StoreInfo(BaseModel):
    """What the store holds (``darkmatter store info``)."""

    path: str = Field(description="Folder of the store, relative to the run folder.")
    model: str
    sites: list[str]
    d: dict[str, int]
    dtype: str
    ctx_len: int
    n_contexts: int
    tokens: int
    skip_positions: int
    with_loss: bool
    shards_done: int
    shards_total: int
    complete: bool
    bytes: int
    identity_hash: str


class HarvestResult(Result):
    """What the harvest step produced."""

    store: StoreInfo
    tokens_per_second: float | None = Field(None, description="Harvest throughput of the last (partial) run.")
    seconds: float = Field(0.0, description="Wall time of the step in this run.")


class HarvestStep(Step[HarvestResult]):
    name = "harvest"
    title = "activations of the model on the study's contexts"
    result_type = HarvestResult
    distributed = True

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {
            "model": cfg.section("model"),
            "text": cfg.section("text"),
            "harvest": cfg.section("harvest"),
            "sites": cfg.sites(),
        }

    def is_current(self, ctx: StudyContext, result: HarvestResult) -> bool:
        if not (ctx.paths.store / MANIFEST).is_file():
            return False
        store = ActivationStore.open(ctx.paths.store)
        return store.complete and not store.missing_shards()

    def run(self, ctx: StudyContext) -> HarvestResult:
        t0 = time.perf_counter()
        cfg = ctx.cfg
        tokenizer, bos = ctx.tokenizer  # the text is checked before the model's weights load
        contexts = make_contexts(cfg.text, tokenizer, bos)
        rates: list[float] = []
        bar = ctx.progress("harvest")

        def report(done: int, total: int, rate: float) -> None:
            rates.append(rate)
            if bar is not None:
                bar(done, total, rate)

        harvest_cfg = cfg.harvest.model_copy(update={"sites": cfg.sites()})
        store = harvest(
            ctx.lm, contexts, cfg.text, harvest_cfg, str(ctx.paths.store), progress=report, ranks=ctx.ranks
        )
        ctx.use_store(store)
        info = store.info() | {"path": ctx.paths.relative(store.root)}
        return HarvestResult(
            store=StoreInfo.model_validate(info),
            tokens_per_second=rates[-1] if rates else None,
            seconds=time.perf_counter() - t0,
        )

    def headline(self, result: HarvestResult) -> str:
        return f"{result.store.tokens:,} tokens"


HARVEST = HarvestStep()
