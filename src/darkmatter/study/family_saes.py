"""The SAE family of a run: its record in ``results/family.json`` and how a step gets the SAEs back."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from darkmatter.config.schema import StudyConfig
from darkmatter.errors import ShapeError
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


def load_external(cfg: StudyConfig, store: ActivationStore) -> dict[str, SAE]:
    """The configured external SAEs, with their site overrides, checked against the store."""
    saes: dict[str, SAE] = {}
    for ext in cfg.family.external:
        sae = load_sae(ext.path, format=ext.format, hookpoint=ext.hookpoint, online=cfg.model.online)
        if ext.site:
            sae.cfg.hook_site = ext.site
        if sae.cfg.hook_site not in store.sites:
            raise ShapeError(
                f"SAE {ext.name!r} reads {sae.cfg.hook_site!r}, which the store lacks "
                f"({store.sites}); set its 'site' or add the site to harvest.sites."
            )
        if sae.cfg.d_in != store.d[sae.cfg.hook_site]:
            raise ShapeError(
                f"SAE {ext.name!r} ({ext.path}) reads vectors of width {sae.cfg.d_in}, but the model's "
                f"{sae.cfg.hook_site} has width {store.d[sae.cfg.hook_site]}: the SAE belongs to another "
                "model; check model.name and the SAE's path."
            )
        saes[ext.name] = sae
    return saes


def trained_paths(run_dir: Path, result: FamilyResult) -> dict[str, Path]:
    """Name -> folder of every SAE the family step trained."""
    return {r.name: run_dir / r.path for r in result.saes if r.source == "trained"}


def load_family(
    cfg: StudyConfig, run_dir: Path, store: ActivationStore, result: FamilyResult
) -> dict[str, SAE]:
    """The family as the family step left it: trained SAEs from the run folder, external ones as configured
    (format, hookpoint and site overrides applied)."""
    if cfg.family.external:
        return load_external(cfg, store)
    return {name: load_sae(path) for name, path in trained_paths(run_dir, result).items()}
