"""Gradient pursuit (Figs 1, 10a): each width-sweep SAE's decoder with each token's own L0 as budget,
against the plain SAE on the same tokens; the gap in FVU_nonlinear is the encoder error.

Pursuit is costly, so it runs on a few contexts, too few to fit a probe of d + 1 coefficients per output
without overfitting. The SAE's FVU_nonlinear therefore uses the engine's probe (fitted on the whole train
split, as in the engine's numbers); the encoder error is the paired difference of two probes refitted on
the pursued contexts (the SAE's and its pursuit's), whose overfitting cancels.

Under ``torchrun`` every rank runs the step on its share of the shards (the pursued contexts in them);
the sums meet and rank 0's result is recorded."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from darkmatter.config.schema import StudyConfig
from darkmatter.experiments.decomposition import SAEStats, decompose
from darkmatter.experiments.decomposition.accumulators import n_blocks
from darkmatter.experiments.fixed_probes import fvu_with_probes
from darkmatter.experiments.inputs import on_device, probe_on
from darkmatter.results import Number, Result
from darkmatter.sae import SAE
from darkmatter.sae.pursuit import PursuitSAE
from darkmatter.stats.jackknife import finite_interval
from darkmatter.study.budget import describe_groups
from darkmatter.study.context import StudyContext
from darkmatter.study.step import Step
from darkmatter.study.steps.engine import ENGINE


class PursuitRow(BaseModel):
    """One SAE of the width sweep, plain and pursued, on the same test tokens."""

    name: str
    d_sae: int
    fvu: Number
    fvu_nonlinear: Number = Field(description="With the engine's probe (fitted on the whole train split).")
    pursuit_fvu: Number
    pursuit_fvu_nonlinear: Number = Field(description="fvu_nonlinear − encoder_error.")
    pursuit_l0: Number
    encoder_error: Number = Field(
        description="FVU_nonlinear of the SAE minus that of its pursuit, each with a probe refitted on the "
        "pursued contexts' train tokens: a paired difference, so the refits' overfitting cancels."
    )
    refit_fvu_nonlinear: Number = Field(description="The SAE's FVU_nonlinear with the refitted probe.")
    refit_pursuit_fvu_nonlinear: Number = Field(description="The pursuit's, with its refitted probe.")
    intervals: dict[str, list[Number]] = Field(
        default_factory=dict,
        description="fvu_drop (fvu − pursuit_fvu) and encoder_error -> [low, high]: 95% delete-one-block "
        "jackknife over the pursued contexts, both probes refitted per block (empty with < 3 blocks).",
    )


class PursuitResult(Result):
    """Gradient pursuit on the width sweep, measured on the same tokens as the plain SAEs."""

    saes: list[PursuitRow]
    n_contexts: int
    n_train: int = Field(0, description="Train tokens of the pursued contexts (the refits' data).")
    n_test: int


class PursuitStep(Step[PursuitResult]):
    name = "pursuit"
    title = "gradient pursuit and the encoder error (Figs 1, 10a)"
    result_type = PursuitResult
    needs = (ENGINE,)
    version = 2
    distributed = True

    def enabled(self, cfg: StudyConfig) -> bool:
        return cfg.pursuit.enabled

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {"pursuit": cfg.section("pursuit")}

    def run(self, ctx: StudyContext) -> PursuitResult:
        width_sweep = ctx.roles.width_sweep
        if not width_sweep:
            ctx.log("pursuit: the family has no width sweep at the main site; nothing to pursue")
            return PursuitResult(saes=[], n_contexts=0, n_test=0)
        contexts = spread_contexts(ctx.cfg.pursuit.n_contexts, ctx.store.n_contexts)
        blocks = n_blocks(ctx.store, ctx.cfg.engine.interval_blocks)
        rows: list[PursuitRow] = []
        n_train = n_test = 0
        # each SAE and its pursuit (same weights, moments of their own) are in the same group
        # rank 0's grouping on every rank: each group's passes are collectives that all ranks make together
        groups = ctx.ranks.broadcast(ctx.sae_groups(width_sweep, what="pursuit", blocks=blocks, copies=2))
        if len(groups) > 1:
            ctx.log(f"pursuit: SAEs streamed in {describe_groups(groups)} to fit the device memory budget")
        for group in groups:
            plain = {n: on_device(ctx.saes[n], ctx.device, ctx.sae_dtype) for n in group}
            saes: dict[str, SAE] = dict(plain)
            saes |= {f"{n}+pursuit": PursuitSAE.from_sae(plain[n]) for n in group}
            refit = decompose(
                ctx.store,
                saes,
                split=ctx.split,
                device=ctx.device,
                second_pass=False,
                contexts=contexts,
                progress=ctx.progress("pursuit"),
                interval_site=ctx.roles.main_site,
                interval_blocks=ctx.cfg.engine.interval_blocks,
                ranks=ctx.ranks,
            )
            fixed, _ = fvu_with_probes(
                ctx.store,
                plain,
                {n: probe_on(ctx.probe(n), ctx.device) for n in group},
                split=ctx.split,
                contexts=contexts,
                device=ctx.device,
                dtype=ctx.sae_dtype,
                ranks=ctx.ranks,
            )
            rows += [
                _row(n, fixed[n].fvu_nonlinear, refit.stats[n], refit.stats[f"{n}+pursuit"]) for n in group
            ]
            n_train, n_test = refit.n_train, refit.n_test
            del saes, plain
            ctx.saes.release(group)
        if not ctx.ranks.leader:  # every rank holds the same rows; the runner records rank 0's
            return PursuitResult(saes=[], n_contexts=0, n_test=0)
        return PursuitResult(saes=rows, n_contexts=len(contexts), n_train=n_train, n_test=n_test)

    def headline(self, result: PursuitResult) -> str:
        return ", ".join(f"{r.d_sae}: FVU {r.fvu:.3f}→{r.pursuit_fvu:.3f}" for r in result.saes) or "no SAEs"


def spread_contexts(n: int, n_contexts: int) -> np.ndarray:
    """``n`` context ids spread evenly over the store, so they fall in every shard (the jackknife blocks)."""
    return np.unique(np.linspace(0, n_contexts - 1, num=min(n, n_contexts)).round().astype(np.int64))


def _paired_intervals(sae: SAEStats, pursued: SAEStats) -> dict[str, list[float]]:
    """Jackknife intervals of the FVU drop and the encoder error from the paired per-block replicates."""
    out: dict[str, list[float]] = {}
    for key, stat, point in (
        ("fvu_drop", "fvu", sae.fvu - pursued.fvu),
        ("encoder_error", "fvu_nonlinear", sae.fvu_nonlinear - pursued.fvu_nonlinear),
    ):
        a, b = sae.jackknife.get(stat, []), pursued.jackknife.get(stat, [])
        interval = finite_interval(point, [x - y for x, y in zip(a, b, strict=True)]) if a and b else None
        if interval is not None:
            out[key] = interval
    return out


def _row(name: str, fvu_nonlinear: float, sae: SAEStats, pursued: SAEStats) -> PursuitRow:
    """The SAE's FVU_nonlinear with the engine's probe; the encoder error from the paired refits."""
    encoder_error = sae.fvu_nonlinear - pursued.fvu_nonlinear
    return PursuitRow(
        name=name,
        d_sae=sae.d_sae,
        fvu=sae.fvu,
        fvu_nonlinear=fvu_nonlinear,
        pursuit_fvu=pursued.fvu,
        pursuit_fvu_nonlinear=fvu_nonlinear - encoder_error,
        pursuit_l0=pursued.l0,
        encoder_error=encoder_error,
        refit_fvu_nonlinear=sae.fvu_nonlinear,
        refit_pursuit_fvu_nonlinear=pursued.fvu_nonlinear,
        intervals=_paired_intervals(sae, pursued),
    )


PURSUIT = PursuitStep()
