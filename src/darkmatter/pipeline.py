"""``darkmatter run`` as a library call: the study's steps in order, each skipped when already done."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from darkmatter.config import StudyConfig
from darkmatter.harvest import Progress, harvest
from darkmatter.lm.loading import LoadedLM, load_lm
from darkmatter.results import Result, read_result, write_result
from darkmatter.store import ActivationStore
from darkmatter.text import make_contexts

Log = Callable[[str], None]
ProgressFactory = Callable[[str], Progress | None]


class HarvestResult(Result):
    """What the harvest step produced."""

    store: dict[str, Any] = Field(description="Summary of the activation store.")
    tokens_per_second: float | None = Field(None, description="Harvest throughput of the last (partial) run.")
    seconds: float = Field(0.0, description="Wall time of the step in this run.")


def store_dir(out: str | Path) -> Path:
    return Path(out) / "store"


class Study:
    """Runs a study's steps into an output directory, lazily loading the model once."""

    def __init__(
        self,
        cfg: StudyConfig,
        out: str | Path,
        *,
        log: Log = print,
        progress: ProgressFactory | None = None,
    ):
        self.cfg = cfg
        self.out = Path(out)
        self.log = log
        self.progress = progress or (lambda _name: None)
        self._lm: LoadedLM | None = None
        self.timings: dict[str, float] = {}

    @property
    def lm(self) -> LoadedLM:
        if self._lm is None:
            m = self.cfg.model
            self._lm = load_lm(
                m.name,
                device=m.device,
                dtype=m.dtype,
                online=m.online or None,
                trust_remote_code=m.trust_remote_code,
            )
        return self._lm

    def step_harvest(self) -> ActivationStore:
        """Harvest the configured sites (resuming a partial store); skipped when complete and unchanged."""
        key = self.cfg.section_hash("model", "text", "harvest")
        done = read_result(self.out, "harvest", HarvestResult)
        if done is not None and done.config_hash == key and (store_dir(self.out) / "manifest.json").is_file():
            store = ActivationStore.open(store_dir(self.out))
            if store.complete:
                self.log(f"harvest: up to date ({store.info()['tokens']} tokens)")
                return store
        t0 = time.perf_counter()
        contexts = make_contexts(self.cfg.text, self.lm.tokenizer, self.lm.bos_token_id)
        rate: list[float] = []
        bar = self.progress("harvest")

        def report(done_tok: int, total: int, tps: float) -> None:
            rate.append(tps)
            if bar is not None:
                bar(done_tok, total, tps)

        store = harvest(
            self.lm, contexts, self.cfg.text, self.cfg.harvest, str(store_dir(self.out)), progress=report
        )
        seconds = time.perf_counter() - t0
        write_result(
            self.out,
            HarvestResult(
                experiment="harvest",
                config_hash=key,
                seed=self.cfg.seed,
                config={
                    "model": self.cfg.model.model_dump(),
                    "text": self.cfg.text.model_dump(),
                    "harvest": self.cfg.harvest.model_dump(),
                },
                store=store.info(),
                tokens_per_second=rate[-1] if rate else None,
                seconds=seconds,
            ),
        )
        self.log(f"harvest: {store.info()['tokens']} tokens in {seconds:.1f}s")
        return store

    def step_report(self) -> Path:
        from darkmatter.report.html import write_report

        path = write_report(self.out)
        self.log(f"report: {path}")
        return path

    def run(self) -> Path:
        """Every step in order; returns the report path."""
        for name, step in (("harvest", self.step_harvest), ("report", self.step_report)):
            t0 = time.perf_counter()
            step()
            self.timings[name] = time.perf_counter() - t0
        return self.out / "report.html"


def run_study(cfg: StudyConfig, out: str | Path, **kwargs: Any) -> Path:
    """Run a whole study; see ``Study``."""
    return Study(cfg, out, **kwargs).run()
