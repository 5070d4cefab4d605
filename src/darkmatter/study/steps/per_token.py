"""Per-token scaling (Figs 4, 5, 12, 16): error norms of one SAE predicted from another's, token by token,
from the engine's norm Grams and per-token table."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from darkmatter.config.schema import StudyConfig
from darkmatter.experiments.per_token import (
    norm_samples,
    scaling_between_saes,
    scaling_intervals,
    token_trace,
)
from darkmatter.results import Result
from darkmatter.study.context import StudyContext
from darkmatter.study.step import Step
from darkmatter.study.steps.engine import ENGINE, EngineResult, load_norm_grams, norm_grams_path

Matrix = list[list[float | None]]


class TokenTrace(BaseModel):
    """Error norms over consecutive tokens of one context (Fig 5)."""

    context: int
    positions: list[int]
    tokens: list[str]
    split: list[str] = Field(description="train or test, per token.")
    error_norm: dict[str, list[float]] = Field(description="SAE name -> ‖e‖ per token.")


class NormSamples(BaseModel):
    """A seeded sample of test tokens' linear and nonlinear error norms, per SAE of the sweep (Fig 12)."""

    linear: list[list[float]]
    nonlinear: list[list[float]]


class PerTokenResult(Result):
    """Per-token predictability of larger SAEs' error norms from smaller ones' (rows: smaller SAE)."""

    names: list[str]
    widths: list[int]
    r2: Matrix = Field(description="R² of ‖e_j‖² from c·‖e_i‖² (row i < column j), Eq. 13.")
    r2_intercept: Matrix = Field(description="Same with an intercept.")
    r2_plain: Matrix = Field(description="Unsquared norms with intercept (the original code's variant).")
    nonlinear_gain: Matrix = Field(
        description="Percent reduction of unexplained variance when ‖NonlinearError_i‖² is added (App. E)."
    )
    nonlinear_gain_plain: Matrix = Field(
        description="The same with plain norms ‖e‖, ‖NonlinearError‖ (the paper's code's variant)."
    )
    intervals: dict[str, list[list[list[float] | None]]] = Field(
        default_factory=dict,
        description="Matrix name -> [low, high] per cell: 95% jackknife over blocks of contexts.",
    )
    trace: TokenTrace | None = None
    norm_samples: NormSamples | None = None
    mean_linear_norm: list[float]
    mean_nonlinear_norm: list[float]


class PerTokenStep(Step[PerTokenResult]):
    name = "per_token"
    title = "per-token scaling of error norms across widths (Figs 4, 5, 12, 16)"
    result_type = PerTokenResult
    needs = (ENGINE,)
    version = 2

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {"seed": cfg.seed}

    def run(self, ctx: StudyContext) -> PerTokenResult:
        engine = ctx.result(ENGINE.name, EngineResult)
        names = engine.width_sweep
        stats = {s.name: s for s in engine.saes}
        gram = load_norm_grams(norm_grams_path(ctx))[ctx.cfg.main_site]
        table = ctx.paths.token_table
        trace = samples = None
        if names:
            tokenizer = ctx.lm.tokenizer
            trace = TokenTrace(**token_trace(table, names, lambda t: tokenizer.decode([t])))
            samples = NormSamples(**norm_samples(table, names, seed=ctx.cfg.seed))
        return PerTokenResult(
            names=names,
            widths=[stats[n].d_sae for n in names],
            **scaling_between_saes(gram, names),
            intervals=scaling_intervals(gram, names),
            trace=trace,
            norm_samples=samples,
            mean_linear_norm=[stats[n].mean_linear_norm for n in names],
            mean_nonlinear_norm=[stats[n].mean_nonlinear_norm for n in names],
        )

    def headline(self, result: PerTokenResult) -> str:
        r2 = [v for row in result.r2 for v in row if v is not None]
        return f"per-token R² {min(r2):.2f}-{max(r2):.2f}" if r2 else "fewer than two widths"


PER_TOKEN = PerTokenStep()
