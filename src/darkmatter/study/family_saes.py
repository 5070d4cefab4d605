"""The SAE family of a run: its record in ``results/family.json`` and how a step gets the SAEs back."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from darkmatter.config.schema import ExternalSAE, StudyConfig
from darkmatter.errors import ShapeError
from darkmatter.lm.loading import network_allowed
from darkmatter.results import Result
from darkmatter.sae import SAE, load_sae
from darkmatter.sae.train import TrainingPoint
from darkmatter.store import ActivationStore


class SAERecord(BaseModel):
    """One SAE of the family: identity, where it lives, and held-out quality."""

    name: str
    site: str
    d_in: int
    d_sae: int
    k: int | None
    activation: str
    path: str = Field(description="Trained: relative to the run folder; external: as configured.")
    source: str = Field(description="'trained' or the external format name.")
    fvu: float
    nmse: float
    l0: float
    dead_fraction: float
    eval_tokens: int
    history: list[TrainingPoint] = Field(
        default_factory=list, description="Training curve (train-batch FVU; validation FVU where measured)."
    )
    converged: bool | None = Field(
        None, description="Validation FVU met the convergence criterion; None: external or not measured."
    )
    val_fvu_change: float | None = Field(
        None,
        description="Relative fall of the validation FVU over the convergence window (last quarter "
        "before the learning-rate decay).",
    )


class FamilyResult(Result):
    """The SAE family and its quality on held-out (test-split) tokens."""

    saes: list[SAERecord]
    train_seconds: float = 0.0
    train_tokens_per_second: float | None = None
    converge_tol: float | None = Field(None, description="Tolerance of the convergence criterion.")
    validation_tokens: int | None = Field(None, description="Tokens of the trainer's validation set.")


@dataclass(frozen=True)
class SAEShape:
    """What the roles and the planner need of an SAE, without its weights."""

    site: str
    d_in: int
    d_sae: int
    k: int | None


class SAEFamily(Mapping[str, SAE]):
    """The family's SAEs by name, each loaded from disk on first use, moved to the study's device in its
    SAE dtype, and kept until `release`d. Iterating or sizing it loads nothing (`shapes` has the metadata),
    so a step holds only the SAEs it is using."""

    def __init__(
        self,
        shapes: dict[str, SAEShape],
        load: Callable[[str], SAE],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.shapes = shapes
        self._load = load
        self.device = torch.device(device)
        self.dtype = dtype
        self._loaded: dict[str, SAE] = {}

    @classmethod
    def of(cls, saes: Mapping[str, SAE]) -> SAEFamily:
        """A family over SAEs already in memory (kept where they are)."""
        shapes = {n: shape_of(s) for n, s in saes.items()}
        family = cls(shapes, lambda n: saes[n])
        family._loaded = dict(saes)
        return family

    def __getitem__(self, name: str) -> SAE:
        if name not in self.shapes:
            raise KeyError(name)
        sae = self._loaded.get(name)
        if sae is None:
            sae = self._load(name).to(device=self.device, dtype=self.dtype)
            self._loaded[name] = sae
        return sae

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def loaded(self) -> list[str]:
        """Names of the SAEs held in memory now."""
        return list(self._loaded)

    def release(self, names: Iterable[str] | None = None) -> None:
        """Drop the named SAEs (all when None) from memory; they load again on next use."""
        for n in list(self._loaded) if names is None else list(names):
            self._loaded.pop(n, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def shape_of(sae: SAE) -> SAEShape:
    return SAEShape(str(sae.cfg.hook_site), sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k)


def load_external_one(
    cfg: StudyConfig,
    ext: ExternalSAE,
    store: ActivationStore,
    *,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> SAE:
    """One configured external SAE on ``device`` in ``dtype``, with its site override, checked against the
    store."""
    named = ext.named()
    sae = load_sae(
        ext.location,
        format=ext.format or (named.format if named else None),
        hookpoint=ext.hookpoint,
        online=cfg.model.online or network_allowed(),
        device=device,
        dtype=dtype,
    )
    if named is not None:
        sae.cfg.metadata.update(release=named.release, sae_id=named.sae_id)
    if ext.site:
        sae.cfg.hook_site = ext.site
    if sae.cfg.hook_site not in store.sites:
        raise ShapeError(
            f"SAE {ext.name!r} reads {sae.cfg.hook_site!r}, which the store lacks "
            f"({store.sites}); set its 'site' or add the site to harvest.sites."
        )
    if sae.cfg.d_in != store.d[sae.cfg.hook_site]:
        raise ShapeError(
            f"SAE {ext.name!r} ({ext.location}) reads vectors of width {sae.cfg.d_in}, but the model's "
            f"{sae.cfg.hook_site} has width {store.d[sae.cfg.hook_site]}: the SAE belongs to another "
            "model; check model.name and the SAE's path."
        )
    return sae


def trained_paths(run_dir: Path, result: FamilyResult) -> dict[str, Path]:
    """Name -> folder of every SAE the family step trained."""
    return {r.name: run_dir / r.path for r in result.saes if r.source == "trained"}


def load_family(
    cfg: StudyConfig,
    run_dir: Path,
    store: ActivationStore,
    result: FamilyResult,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SAEFamily:
    """The family as the family step recorded it, loading each SAE lazily."""
    paths = trained_paths(run_dir, result)
    external = {e.name: e for e in cfg.family.external}

    def load(name: str) -> SAE:
        if name in external:
            return load_external_one(cfg, external[name], store, device=device, dtype=dtype)
        return load_sae(paths[name], device=device, dtype=dtype)

    shapes = {r.name: SAEShape(r.site, r.d_in, r.d_sae, r.k) for r in result.saes}
    return SAEFamily(shapes, load, device, dtype)
