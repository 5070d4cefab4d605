"""``darkmatter run`` as a library call: the study's steps in order, each skipped when already done."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from darkmatter.config import StudyConfig
from darkmatter.harvest import Progress, harvest
from darkmatter.lm.loading import LoadedLM, load_lm
from darkmatter.errors import ShapeError
from darkmatter.results import Result, read_result, write_result
from darkmatter.sae import SAE, load_sae, save_sae
from darkmatter.sae.quality import evaluate_saes
from darkmatter.sae.train import FamilyTrainer
from darkmatter.store import ActivationStore
from darkmatter.text import make_contexts

Log = Callable[[str], None]
ProgressFactory = Callable[[str], Progress | None]


class HarvestResult(Result):
    """What the harvest step produced."""

    store: dict[str, Any] = Field(description="Summary of the activation store.")
    tokens_per_second: float | None = Field(None, description="Harvest throughput of the last (partial) run.")
    seconds: float = Field(0.0, description="Wall time of the step in this run.")


class SAERecord(BaseModel):
    """One SAE of the family: identity, where it lives, and held-out quality."""

    name: str
    site: str
    d_in: int
    d_sae: int
    k: int | None
    activation: str
    path: str
    source: str = Field(description="'trained' or the external format name.")
    fvu: float
    nmse: float
    l0: float
    dead_fraction: float
    eval_tokens: int
    history: list[dict[str, float]] = Field(default_factory=list, description="Training curve (train FVU).")


class FamilyResult(Result):
    """The SAE family and its quality on held-out (test-split) tokens."""

    saes: list[SAERecord]
    train_seconds: float = 0.0
    train_tokens_per_second: float | None = None


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
        hcfg = self.cfg.harvest.model_copy(update={"sites": self.cfg.sites()})
        key = self.cfg.section_hash("model", "text", "harvest") + ":" + ",".join(hcfg.sites)
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
            self.lm, contexts, self.cfg.text, hcfg, str(store_dir(self.out)), progress=report
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
                    "harvest": hcfg.model_dump(),
                },
                store=store.info(),
                tokens_per_second=rate[-1] if rate else None,
                seconds=seconds,
            ),
        )
        self.log(f"harvest: {store.info()['tokens']} tokens in {seconds:.1f}s")
        return store

    def family_hash(self) -> str:
        return self.cfg.section_hash("model", "text", "harvest", "family", "split_seed", "train_fraction")

    def step_family(self, store: ActivationStore) -> dict[str, SAE]:
        """Train the SAE family (or load the external SAEs) and measure held-out quality."""
        key = self.family_hash()
        done = read_result(self.out, "sae_family", FamilyResult)
        if done is not None and done.config_hash == key and all(Path(r.path).exists() for r in done.saes):
            self.log(f"sae_family: up to date ({len(done.saes)} SAEs)")
            return {r.name: load_sae(r.path) for r in done.saes}
        fam = self.cfg.family
        t0 = time.perf_counter()
        records_src: dict[str, str] = {}
        rate: float | None = None
        if fam.external:
            saes = {}
            for ext in fam.external:
                sae = load_sae(ext.path, format=ext.format, hookpoint=ext.hookpoint, online=self.cfg.model.online)
                if ext.site:
                    sae.cfg.hook_site = ext.site
                if sae.cfg.hook_site not in store.sites:
                    raise ShapeError(
                        f"SAE {ext.name!r} reads {sae.cfg.hook_site!r}, which the store lacks ({store.sites}); set "
                        "its 'site' or add the site to harvest.sites."
                    )
                saes[ext.name] = sae
                records_src[ext.name] = ext.path
        else:
            trainer = FamilyTrainer(
                store, fam.specs(self.cfg.layer), fam.train, self.out / "saes" / ".training",
                split_seed=self.cfg.split_seed, train_fraction=self.cfg.train_fraction,
            )
            bar = self.progress("train SAEs")
            rates: list[float] = []

            def report(done_tok: int, total: int, tps: float) -> None:
                rates.append(tps)
                if bar is not None:
                    bar(done_tok, total, tps)

            trained = trainer.train(progress=report)
            rate = rates[-1] if rates else None
            saes = {}
            for spec, sae in zip(trainer.specs, trained, strict=True):
                path = save_sae(sae, self.out / "saes" / spec.name)
                saes[spec.name] = sae
                records_src[spec.name] = str(path)
            histories = {m.spec.name: m.history for m in trainer.members}
        train_seconds = time.perf_counter() - t0
        quality = evaluate_saes(
            store, saes, split="test", split_seed=self.cfg.split_seed, train_fraction=self.cfg.train_fraction
        )
        records = [
            SAERecord(
                name=n, site=str(s.cfg.hook_site), d_in=s.cfg.d_in, d_sae=s.cfg.d_sae, k=s.cfg.k,
                activation=s.cfg.activation, path=records_src[n],
                source="trained" if not fam.external else s.cfg.source_format,
                fvu=quality[n]["fvu"], nmse=quality[n]["nmse"], l0=quality[n]["l0"],
                dead_fraction=quality[n]["dead_fraction"], eval_tokens=int(quality[n]["tokens"]),
                history=[] if fam.external else histories[n],
            )
            for n, s in saes.items()
        ]
        write_result(
            self.out,
            FamilyResult(
                experiment="sae_family", config_hash=key, seed=self.cfg.seed,
                config={"family": fam.model_dump(), "layer": self.cfg.layer, "split_seed": self.cfg.split_seed,
                        "train_fraction": self.cfg.train_fraction},
                saes=records, train_seconds=train_seconds, train_tokens_per_second=rate,
            ),
        )
        for r in records:
            self.log(f"sae_family: {r.name:<24} FVU {r.fvu:.4f}  L0 {r.l0:6.1f}  dead {r.dead_fraction:.1%}")
        return saes

    def step_report(self) -> Path:
        from darkmatter.report.html import write_report

        path = write_report(self.out)
        self.log(f"report: {path}")
        return path

    def run(self) -> Path:
        """Every step in order; returns the report path."""
        t0 = time.perf_counter()
        store = self.step_harvest()
        self.timings["harvest"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.step_family(store)
        self.timings["sae_family"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.step_report()
        self.timings["report"] = time.perf_counter() - t0
        return self.out / "report.html"


def run_study(cfg: StudyConfig, out: str | Path, **kwargs: Any) -> Path:
    """Run a whole study; see ``Study``."""
    return Study(cfg, out, **kwargs).run()
