"""SAEs trained on one SAE's LinearError and NonlinearError (Figs 7, 8), each component computed on the
fly from the store with the engine's probe b*. Under torchrun every rank trains (data-parallel) and measures
its share of the store; rank 0 alone saves the SAEs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from darkmatter.config.schema import StudyConfig
from darkmatter.experiments.error_saes import ErrorSAEsResult, train_error_saes
from darkmatter.sae import SAE, load_sae, save_sae
from darkmatter.sae.train_logs import TrainLogs
from darkmatter.study.context import StudyContext
from darkmatter.study.readable import sae_folder_ok
from darkmatter.study.step import Step
from darkmatter.study.steps.engine import ENGINE


class ErrorSAEsStepResult(ErrorSAEsResult):
    """The error-component SAEs of one SAE of the family."""

    sae_name: str = Field(description="The family SAE whose error components the SAEs were trained on.")


def error_sae_folder(ctx: StudyContext, component: str) -> Path:
    return ctx.paths.inside(ctx.paths.error_saes / component)


def load_error_saes(ctx: StudyContext) -> dict[str, SAE]:
    """Component -> the SAE trained on it, as the error-SAE step saved it, on the study's device in its SAE
    precision."""
    return {
        c: load_sae(error_sae_folder(ctx, c), device=ctx.device, dtype=ctx.sae_dtype)
        for c in ctx.cfg.error_saes.components
    }


class ErrorSAEsStep(Step[ErrorSAEsStepResult]):
    name = "error_saes"
    title = "SAEs trained on the linear and nonlinear error (Figs 7, 8)"
    result_type = ErrorSAEsStepResult
    needs = (ENGINE,)
    version = 2
    distributed = True  # training and the quality pass are shared by the ranks; rank 0 saves the SAEs

    def enabled(self, cfg: StudyConfig) -> bool:
        return cfg.error_saes.enabled

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {"error_saes": cfg.error_saes.model_dump(mode="json", exclude={"interp", "enabled"})}

    def is_current(self, ctx: StudyContext, result: ErrorSAEsStepResult) -> bool:
        return all(sae_folder_ok(error_sae_folder(ctx, c)) for c in result.components)

    def run(self, ctx: StudyContext) -> ErrorSAEsStepResult:
        settings = ctx.cfg.error_saes
        name = ctx.roles.chosen(settings.sae, "error_saes.sae")
        sae = ctx.saes[name]
        with ctx.train_logs("error_saes") as logs:
            res, trained = self._train(ctx, sae, name, logs)
        result = ErrorSAEsStepResult(**dict(res), sae_name=name)
        if not ctx.ranks.leader:
            return result  # the same numbers; the runner records rank 0's
        for component, error_sae in trained.items():
            save_sae(error_sae, error_sae_folder(ctx, component))
        for c in settings.components:
            q = res.saes[c]
            ctx.log(f"error SAE on {c} error of {name}: held-out FVU {q.fvu:.3f}, L0 {q.l0:.1f}")
        return result

    def _train(
        self, ctx: StudyContext, sae: SAE, name: str, logs: TrainLogs | None
    ) -> tuple[ErrorSAEsResult, dict[str, SAE]]:
        settings = ctx.cfg.error_saes
        return train_error_saes(
            ctx.store,
            sae,
            ctx.probe(name),
            components=tuple(settings.components),
            d_sae=settings.d_sae or sae.cfg.d_sae,
            k=settings.k or sae.cfg.k or ctx.cfg.family.k,
            train=ctx.train_config(settings.train),
            workdir=ctx.paths.error_saes / ".training",
            split=ctx.split,
            progress=ctx.progress("train error SAEs"),
            dtype=ctx.sae_dtype,  # on the trainer's device, the analysis device unless train.device is set
            train_logs=logs,
            ranks=ctx.ranks,
        )

    def headline(self, result: ErrorSAEsStepResult) -> str:
        return ", ".join(f"FVU on {c} {q.fvu:.3f}" for c, q in result.saes.items())


ERROR_SAES = ErrorSAEsStep()
