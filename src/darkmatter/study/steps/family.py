"""The SAE family: trained here on the train split (width sweep, k sweep, auxiliary sites) or loaded from
``family.external``, and measured on held-out tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from darkmatter.config.schema import StudyConfig
from darkmatter.sae import SAE, load_sae, save_sae
from darkmatter.sae.convergence import convergence
from darkmatter.sae.quality import evaluate_saes
from darkmatter.sae.train import FamilyTrainer, TrainingPoint
from darkmatter.sae.train_logs import log_every
from darkmatter.study.budget import GB, engine_sae_bytes, group_saes
from darkmatter.study.context import StudyContext
from darkmatter.study.family_saes import FamilyResult, SAERecord, load_external_one, shape_of, trained_paths
from darkmatter.study.readable import sae_folder_ok
from darkmatter.study.step import Step
from darkmatter.study.steps.harvest import HARVEST


class FamilyStep(Step[FamilyResult]):
    name = "family"
    title = "the SAE family and its held-out quality"
    result_type = FamilyResult
    needs = (HARVEST,)
    distributed = True  # training and the held-out quality pass are data-parallel; rank 0 saves the SAEs

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {
            "family": cfg.section("family"),
            "layer": cfg.layer,
            "split_seed": cfg.split_seed,
            "train_fraction": cfg.train_fraction,
        }

    def is_current(self, ctx: StudyContext, result: FamilyResult) -> bool:
        return all(sae_folder_ok(p) for p in trained_paths(ctx.paths.root, result).values())

    def run(self, ctx: StudyContext) -> FamilyResult:
        t0 = time.perf_counter()
        trained: _Trained | None = None
        fam = ctx.cfg.family
        if not ctx.ranks.leader and fam.external:
            return _elsewhere()  # rank 0 loads (and may convert) and measures external SAEs alone
        if fam.external:
            records = _external_records(ctx)
            train_seconds = time.perf_counter() - t0
        else:
            trained = _train(ctx)
            train_seconds = time.perf_counter() - t0
            records = []
            shapes = {n: shape_of(s) for n, s in trained.saes.items()}
            groups = ctx.sae_groups(list(shapes), what="family quality", shapes=shapes)
            for group in ctx.ranks.broadcast(groups):  # rank 0's grouping: each pass is a collective
                members = {n: trained.saes[n] for n in group}
                records += _records(ctx, members, trained.paths, trained.histories)
            if not ctx.ranks.leader:
                return _elsewhere()
        ctx.use_family(None)
        tol = ctx.cfg.family.train.converge_tol
        for r in records:
            ctx.log(f"family: {r.name:<24} FVU {r.fvu:.4f}  L0 {r.l0:6.1f}  dead {r.dead_fraction:.1%}")
            if r.converged is False and r.val_fvu_change is not None:
                ctx.log(
                    f"family: {r.name} not converged: validation FVU changed {abs(r.val_fvu_change):.1%} "
                    f"over the last quarter of training before the learning rate decays (tolerance {tol:.1%})"
                )
        return FamilyResult(
            saes=records,
            train_seconds=train_seconds,
            train_tokens_per_second=trained.rate if trained else None,
            converge_tol=None if trained is None else tol,
            validation_tokens=trained.validation_tokens if trained else None,
        )

    def headline(self, result: FamilyResult) -> str:
        fvus = [s.fvu for s in result.saes]
        return f"{len(fvus)} SAEs, held-out FVU {min(fvus):.3f}-{max(fvus):.3f}"


def _elsewhere() -> FamilyResult:
    """What a rank other than 0 returns: the runner records rank 0's result only."""
    return FamilyResult(
        saes=[], train_seconds=0.0, train_tokens_per_second=None, converge_tol=None, validation_tokens=None
    )


@dataclass
class _Trained:
    saes: dict[str, SAE]
    paths: dict[str, str]
    histories: dict[str, list[dict[str, float]]]
    rate: float | None
    validation_tokens: int


def _train(ctx: StudyContext) -> _Trained:
    """Train the family in one pass over the train split; save each SAE and load it back as a rerun would."""
    fam = ctx.cfg.family
    workdir = ctx.paths.saes / ".training"
    bar = ctx.progress("train SAEs")
    rates: list[float] = []

    def report(done: int, total: int, rate: float) -> None:
        rates.append(rate)
        if bar is not None:
            bar(done, total, rate)

    with ctx.train_logs("family") as logs:
        trainer = FamilyTrainer(
            ctx.store,
            fam.specs(ctx.cfg.layer),
            ctx.train_config(fam.train),
            workdir,
            split=ctx.split,
            log=logs,
            log_every=log_every(logs),
            ranks=ctx.ranks,
        )
        trained = trainer.train(progress=report)
    saes: dict[str, SAE] = {}
    paths: dict[str, str] = {}
    if ctx.ranks.leader:
        for spec, sae in zip(trainer.specs, trained, strict=True):
            save_sae(sae, ctx.paths.sae(spec.name))
    ctx.ranks.barrier()  # every rank measures the SAEs rank 0 saved
    for spec in trainer.specs:
        folder = ctx.paths.sae(spec.name)
        saes[spec.name] = load_sae(folder, device=ctx.device, dtype=ctx.sae_dtype)  # as a resumed run loads
        paths[spec.name] = ctx.paths.relative(folder)
    histories = {m.spec.name: m.history for m in trainer.members}
    n_val = trainer.validation.n_tokens if trainer.validation else 0
    return _Trained(saes, paths, histories, rates[-1] if rates else None, n_val)


def _records(
    ctx: StudyContext,
    saes: dict[str, SAE],
    paths: dict[str, str],
    histories: dict[str, list[dict[str, float]]],
) -> list[SAERecord]:
    """Records of SAEs in memory, measured in one pass over the store's test split."""
    quality = evaluate_saes(
        ctx.store, saes, split=ctx.split, part="test", device=str(ctx.device), ranks=ctx.ranks
    )
    return [_record(n, s, paths[n], histories.get(n, []), quality[n], ctx) for n, s in saes.items()]


def _external_records(ctx: StudyContext) -> list[SAERecord]:
    """The external SAEs, loaded one at a time onto the study's device and measured in groups that fit the
    device budget (each SAE's size estimated from its files before it loads); each group is released."""
    chosen = ctx.cfg.resources.sae_memory_gb
    capacity = int(chosen * GB) if chosen is not None else ctx.budget.device_bytes
    width = ctx.sae_dtype.itemsize
    records: list[SAERecord] = []
    group: dict[str, SAE] = {}
    used = 0
    paths = {e.name: e.location for e in ctx.cfg.family.external}
    for ext in ctx.cfg.family.external:
        estimate = _bytes_on_disk(Path(paths[ext.name]).expanduser())
        if group and used + estimate > capacity:
            records += _records(ctx, group, paths, {})
            group, used = {}, 0
        sae = load_external_one(ctx.cfg, ext, ctx.store, device=ctx.device, dtype=ctx.sae_dtype)
        cost = engine_sae_bytes(sae.cfg.d_in, sae.cfg.d_sae, dtype_bytes=width, blocks=0)
        group_saes({ext.name: cost}, capacity, what="family quality")  # one SAE too large: a clear error
        if group and used + cost > capacity:
            records += _records(ctx, group, paths, {})
            group, used = {}, 0
        group[ext.name] = sae
        used += cost
    if group:
        records += _records(ctx, group, paths, {})
    return records


def _bytes_on_disk(path: Path) -> int:
    """Bytes of an SAE's files (0 when not local): an estimate of its weights before loading them."""
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return 0


def _record(
    name: str,
    sae: SAE,
    path: str,
    history: list[dict[str, float]],
    quality: dict[str, float],
    ctx: StudyContext,
) -> SAERecord:
    train = ctx.cfg.family.train
    conv = convergence(history, train.converge_tol, train.decay_fraction) if history else None
    return SAERecord(
        name=name,
        site=str(sae.cfg.hook_site),
        d_in=sae.cfg.d_in,
        d_sae=sae.cfg.d_sae,
        k=sae.cfg.k,
        activation=sae.cfg.activation,
        path=path,
        source=sae.cfg.source_format if ctx.cfg.family.external else "trained",
        fvu=quality["fvu"],
        nmse=quality["nmse"],
        l0=quality["l0"],
        dead_fraction=quality["dead_fraction"],
        eval_tokens=int(quality["tokens"]),
        history=[TrainingPoint.model_validate(h) for h in history],
        converged=None if conv is None else conv.converged,
        val_fvu_change=None if conv is None else conv.change,
    )


FAMILY = FamilyStep()
