"""Gradient pursuit (Figs 1, 10a): each width-sweep SAE's decoder with each token's own L0 as budget,
against the plain SAE on the same tokens; the gap in FVU_nonlinear is the encoder error."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from darkmatter.config.schema import StudyConfig
from darkmatter.experiments.decomposition import decompose
from darkmatter.results import Number, Result
from darkmatter.sae import SAE
from darkmatter.sae.pursuit import PursuitSAE
from darkmatter.study.context import StudyContext
from darkmatter.study.step import Step
from darkmatter.study.steps.family import FAMILY


class PursuitRow(BaseModel):
    """One SAE of the width sweep, plain and pursued, on the same test tokens."""

    name: str
    d_sae: int
    fvu: Number
    fvu_nonlinear: Number
    pursuit_fvu: Number
    pursuit_fvu_nonlinear: Number
    pursuit_l0: Number
    encoder_error: Number = Field(description="FVU_nonlinear of the SAE minus that of its pursuit.")


class PursuitResult(Result):
    """Gradient pursuit on the width sweep, measured on the same tokens as the plain SAEs."""

    saes: list[PursuitRow]
    n_contexts: int
    n_test: int


class PursuitStep(Step[PursuitResult]):
    name = "pursuit"
    title = "gradient pursuit and the encoder error (Figs 1, 10a)"
    result_type = PursuitResult
    needs = (FAMILY,)

    def enabled(self, cfg: StudyConfig) -> bool:
        return cfg.pursuit.enabled

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {"pursuit": cfg.section("pursuit")}

    def run(self, ctx: StudyContext) -> PursuitResult:
        width_sweep = ctx.roles.width_sweep
        if not width_sweep:
            ctx.log("pursuit: the family has no width sweep at the main site; nothing to pursue")
            return PursuitResult(saes=[], n_contexts=0, n_test=0)
        contexts = np.arange(min(ctx.cfg.pursuit.n_contexts, ctx.store.n_contexts))
        saes: dict[str, SAE] = {n: ctx.saes[n] for n in width_sweep}
        saes |= {f"{n}+pursuit": PursuitSAE.from_sae(ctx.saes[n]) for n in width_sweep}
        dec = decompose(
            ctx.store,
            saes,
            split=ctx.split,
            second_pass=False,
            progress=ctx.progress("pursuit"),
            contexts=contexts,
        )
        st = dec.stats
        rows = [
            PursuitRow(
                name=n,
                d_sae=st[n].d_sae,
                fvu=st[n].fvu,
                fvu_nonlinear=st[n].fvu_nonlinear,
                pursuit_fvu=st[f"{n}+pursuit"].fvu,
                pursuit_fvu_nonlinear=st[f"{n}+pursuit"].fvu_nonlinear,
                pursuit_l0=st[f"{n}+pursuit"].l0,
                encoder_error=st[n].fvu_nonlinear - st[f"{n}+pursuit"].fvu_nonlinear,
            )
            for n in width_sweep
        ]
        return PursuitResult(saes=rows, n_contexts=len(contexts), n_test=dec.n_test)

    def headline(self, result: PursuitResult) -> str:
        return ", ".join(f"{r.d_sae}: FVU {r.fvu:.3f}→{r.pursuit_fvu:.3f}" for r in result.saes) or "no SAEs"


PURSUIT = PursuitStep()
