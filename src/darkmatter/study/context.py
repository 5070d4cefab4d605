"""What every step gets: the config, the run's paths, logging and progress, and lazy access to the model,
the store, the split, the SAE family and its roles. Steps read and write only through it."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from darkmatter.config.schema import StudyConfig
from darkmatter.errors import ConfigError, StoreError
from darkmatter.lm.loading import LoadedLM, load_lm, load_tokenizer, parse_dtype, resolve_device
from darkmatter.progress import ProgressFactory, no_progress
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.results import R, read_result
from darkmatter.sae import SAE
from darkmatter.sae.train_config import TrainConfig
from darkmatter.sae.train_logs import TrainLogs
from darkmatter.stats.split import Split
from darkmatter.store import MANIFEST, ActivationStore
from darkmatter.study.budget import Budget, detect_budget, group_saes, sae_capacity, sae_cost
from darkmatter.study.family_saes import FamilyResult, SAEFamily, SAEShape, load_family
from darkmatter.study.probes import Probe, load_probe
from darkmatter.study.roles import FamilyRoles, family_roles

Log = Callable[[str], None]


@dataclass(frozen=True)
class RunPaths:
    """Where a run keeps each kind of output, under one folder."""

    root: Path

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def saes(self) -> Path:
        return self.root / "saes"

    @property
    def probes(self) -> Path:
        return self.root / "probes"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def token_table(self) -> Path:
        return self.root / "tables" / "tokens.parquet"

    @property
    def engine(self) -> Path:
        """The engine's per-token norm Grams, read by the per-token step."""
        return self.root / "engine"

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    @property
    def error_saes(self) -> Path:
        return self.root / "error_saes"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    def probe(self, sae_name: str) -> Path:
        return self.inside(self.probes / f"{sae_name}.safetensors")

    def sae(self, sae_name: str) -> Path:
        """The folder of an SAE the family step trains."""
        return self.inside(self.saes / sae_name)

    def inside(self, path: Path) -> Path:
        """``path`` itself, after checking that it resolves inside the run folder (names never escape it)."""
        root = self.root.resolve()
        if not Path(path).resolve().is_relative_to(root):
            raise ConfigError(f"{path} would be written outside the run folder {root}; rename what named it.")
        return Path(path)

    def relative(self, path: Path) -> str:
        """``path`` relative to the run folder (results stay valid when the folder moves)."""
        return str(Path(path).resolve().relative_to(self.root.resolve()))


class StudyContext:
    """The narrow interface between the runner and the steps."""

    def __init__(
        self,
        cfg: StudyConfig,
        out: str | Path,
        *,
        log: Log = print,
        progress: ProgressFactory | None = None,
        ranks: Ranks = SINGLE,
    ):
        """``ranks``: this process's place in a ``torchrun`` run (alone by default); every rank logs with
        its rank, and only rank 0 draws progress."""
        self.cfg = cfg
        self.paths = RunPaths(Path(out))
        self.ranks = ranks
        self.log: Log = log if not ranks.active else (lambda message: log(ranks.label() + message))
        self.progress: ProgressFactory = (progress if ranks.leader else None) or no_progress
        self.split: Split = cfg.split
        self._lm: LoadedLM | None = None
        self._tokenizer: tuple[Any, int | None] | None = None
        self._store: ActivationStore | None = None
        self._saes: SAEFamily | None = None
        self._roles: FamilyRoles | None = None
        self._budget: Budget | None = None

    @property
    def device(self) -> torch.device:
        """The device every step computes on (``analysis.device``, else ``model.device``), resolved."""
        return resolve_device(self.cfg.analysis_device)

    @property
    def sae_dtype(self) -> torch.dtype:
        """The precision SAEs run in on the device (``analysis.sae_dtype``)."""
        return parse_dtype(self.cfg.analysis.sae_dtype)

    @property
    def budget(self) -> Budget:
        """The study's memory and disk budget (``resources``, else detected once)."""
        if self._budget is None:
            self._budget = detect_budget(self.cfg.resources, self.device, self.paths.root)
        return self._budget

    @contextmanager
    def train_logs(self, group: str) -> Iterator[TrainLogs | None]:
        """The TensorBoard / W&B callback the ``logging`` section asks for (None when off), writing under
        ``logs/`` and closed on leaving; ``group`` names the trainer (its event folder and W&B group)."""
        if not self.cfg.logging.enabled or not self.ranks.leader:  # under torchrun rank 0 logs
            yield None
            return
        root = self.paths.root
        logs = TrainLogs(self.cfg.logging, root / "logs", group=group, run_name=root.resolve().name)
        try:
            yield logs
        finally:
            logs.close()

    def train_config(self, train: TrainConfig) -> TrainConfig:
        """``train`` with its device settled (its own, else the study's analysis device)."""
        return train.model_copy(update={"device": self.cfg.train_device(train)})

    @property
    def lm(self) -> LoadedLM:
        """The study's language model, loaded on first use."""
        if self._lm is None:
            m = self.cfg.model
            self._lm = load_lm(
                m.name,
                device=m.device,
                dtype=m.dtype,
                online=m.online or None,
                trust_remote_code=m.trust_remote_code,
                hook_modules=m.hook_modules.given(),
            )
        return self._lm

    @property
    def tokenizer(self) -> tuple[Any, int | None]:
        """(tokenizer, BOS id) of the study's model: the loaded model's, or loaded alone (no weights)."""
        if self._lm is not None:
            return self._lm.tokenizer, self._lm.bos_token_id
        if self._tokenizer is None:
            m = self.cfg.model
            self._tokenizer = load_tokenizer(
                m.name, online=m.online or None, trust_remote_code=m.trust_remote_code
            )
        return self._tokenizer

    @property
    def store(self) -> ActivationStore:
        """The harvested activation store (the harvest step must have completed it)."""
        if self._store is None:
            if not (self.paths.store / MANIFEST).is_file():
                raise StoreError(f"{self.paths.store} holds no activation store; run the harvest step first.")
            store = ActivationStore.open(self.paths.store)
            store.require_complete()
            self._store = store
        return self._store

    @property
    def saes(self) -> SAEFamily:
        """The SAE family as the family step recorded it: each SAE loads on first use onto the study's
        device in ``analysis.sae_dtype`` and stays until released (``ctx.saes.release(names)``)."""
        if self._saes is None:
            result = self.result("family", FamilyResult)
            self._saes = load_family(
                self.cfg, self.paths.root, self.store, result, device=self.device, dtype=self.sae_dtype
            )
        return self._saes

    @property
    def roles(self) -> FamilyRoles:
        """Which SAE plays which part; computed once, from the family's shapes (no weights)."""
        if self._roles is None:
            self._roles = family_roles(self.cfg, self.saes.shapes)
        return self._roles

    def sae_groups(
        self,
        names: Sequence[str],
        *,
        what: str,
        fixed_bytes: int = 0,
        blocks: int = 1,
        copies: int = 1,
        shapes: Mapping[str, SAEShape] | None = None,
    ) -> list[list[str]]:
        """``names`` in groups whose cost fits ``resources.sae_memory_gb``, else the device budget after
        ``fixed_bytes``. Each SAE costs its weights, ``blocks`` jackknife blocks of engine moments (0: none)
        and a chunk of pre-activations, ``copies`` times (a pursuit twin has moments of its own).
        ``shapes``: of SAEs not (yet) in the family record."""
        shapes = self.saes.shapes if shapes is None else shapes
        width = self.sae_dtype.itemsize
        costs = {
            n: sae_cost(shapes[n].d_in, shapes[n].d_sae, dtype_bytes=width, blocks=blocks, copies=copies)
            for n in names
        }
        chosen = self.cfg.resources.sae_memory_gb
        room = sae_capacity(
            self.budget, model_bytes=self._resident_model_bytes(), fixed=fixed_bytes, sae_memory_gb=chosen
        )
        setting = "resources.sae_memory_gb" if chosen is not None else "resources.device_memory_gb"
        return group_saes(costs, room, what=what, setting=setting)

    def _resident_model_bytes(self) -> int:
        """Bytes of the model's weights when it is loaded (0 before)."""
        if self._lm is None:
            return 0
        return sum(p.numel() * p.element_size() for p in self._lm.model.parameters())

    def probe(self, sae_name: str) -> Probe:
        """The engine's error probe b* of an SAE of the family."""
        path = self.paths.probe(sae_name)
        if not path.is_file():
            raise StoreError(f"SAE {sae_name!r} has no error probe at {path}; run the engine step first.")
        return load_probe(path)

    def result(self, name: str, cls: type[R]) -> R:
        """An upstream step's result (it must exist)."""
        found = read_result(self.paths.root, name, cls)
        if found is None:
            raise StoreError(f"{self.paths.results}/{name}.json is missing; run the {name} step first.")
        return found

    def use_store(self, store: ActivationStore) -> None:
        """The store the harvest step just wrote (the family and its roles are read anew)."""
        self._store, self._saes, self._roles = store, None, None

    def use_family(self, saes: Mapping[str, SAE] | None) -> None:
        """SAEs already in memory as the family (None: read the family step's record again)."""
        self._saes, self._roles = (None if saes is None else SAEFamily.of(saes)), None
