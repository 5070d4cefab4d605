"""Earlier-layer predictors (Figs 9b, 10b): the target SAE's error components regressed on the outputs of
SAEs at layer L−1 resid_post, L mlp_out and L attn_out (each and jointly); the joint map's downstream CE;
and an MLP probe on the error (how much of NonlinearError a nonlinear function of x recovers).

Under ``torchrun`` every rank runs the step: the regressions and the MLP probe are data-parallel; the joint
map's CE is computed by every rank alike; rank 0's result is recorded."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from darkmatter.config.schema import StudyConfig
from darkmatter.errors import DataError
from darkmatter.experiments.earlier_layers import EarlierLayersResult, earlier_layer_predictors
from darkmatter.experiments.joint_ce import JointCEResult, downstream_ce_with_joint
from darkmatter.experiments.mlp_probe import mlp_probe
from darkmatter.results import Number, Result
from darkmatter.study.context import StudyContext
from darkmatter.study.step import Step
from darkmatter.study.steps.downstream_ce import held_out_tokens
from darkmatter.study.steps.engine import ENGINE


class MLPProbe(BaseModel):
    """A one-hidden-layer MLP on top of the linear probe, predicting SaeError from x (held-out R²)."""

    hidden: int
    epochs: int
    lr: float
    minibatch: int
    on_probe: bool
    seed: int
    split_seed: int
    train_fraction: float
    n_train: int
    n_test: int
    train_loss: list[float]
    r2_error_mean_over_dims: Number
    r2_error_variance_weighted: Number
    r2_nonlinear_mean_over_dims: Number
    r2_nonlinear_variance_weighted: Number
    probe_r2_error_mean_over_dims: Number
    probe_r2_error_variance_weighted: Number
    fvu_sae: Number
    fvu_sae_linear: Number
    fvu_sae_mlp: Number
    seconds: float


class EarlierLayersStepResult(Result):
    """The regressions (None when the family has no regressor SAEs), the joint map's CE, the MLP probe."""

    target: str = Field(description="The SAE whose error components are predicted.")
    predictors: EarlierLayersResult | None = None
    joint_ce: JointCEResult | None = None
    mlp_probe: MLPProbe | None = None
    notes: list[str] = Field(default_factory=list, description="What was skipped and why.")


class EarlierLayersStep(Step[EarlierLayersStepResult]):
    name = "earlier_layers"
    title = "earlier-layer predictors, the joint map's CE, an MLP probe (Figs 9b, 10b)"
    result_type = EarlierLayersStepResult
    needs = (ENGINE,)
    version = 2
    distributed = True

    def enabled(self, cfg: StudyConfig) -> bool:
        return cfg.earlier_layers.enabled

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {
            "earlier_layers": cfg.section("earlier_layers"),
            "ce_contexts": cfg.earlier_layers.ce_contexts or cfg.downstream_ce.n_contexts,
            "seed": cfg.seed,
            "interval_blocks": cfg.engine.interval_blocks,
        }

    def run(self, ctx: StudyContext) -> EarlierLayersStepResult:
        target = ctx.roles.target
        res = EarlierLayersStepResult(target=target)
        regressors = {n: ctx.saes[n] for n in ctx.roles.regressors}
        if not regressors:
            res.notes.append("no regressor SAEs in the family")
        else:
            _predictors(ctx, res, regressors)
        try:
            settings = ctx.cfg.earlier_layers
            res.mlp_probe = MLPProbe(
                **mlp_probe(
                    ctx.store,
                    ctx.saes[target],
                    ctx.probe(target),
                    split=ctx.split,
                    hidden=settings.mlp_hidden,
                    epochs=settings.mlp_epochs,
                    seed=ctx.cfg.seed,
                    device=ctx.device,
                    dtype=ctx.sae_dtype,
                    progress=ctx.progress("MLP probe", "pass"),
                    ranks=ctx.ranks,
                )
            )
        except DataError as exc:  # e.g. too few tokens: say so, keep the run going
            res.notes.append(f"MLP probe skipped: {exc}")
            ctx.log(f"MLP probe: skipped ({exc})")
        if not ctx.ranks.leader:  # every rank holds the same numbers; the runner records rank 0's
            return EarlierLayersStepResult(target=target)
        return res

    def headline(self, result: EarlierLayersStepResult) -> str:
        el, mlp = result.predictors, result.mlp_probe
        joint = el.r2.get("joint", {}).get("nonlinear") if el is not None else None
        parts = [
            "no joint regression" if joint is None else f"joint R² on NonlinearError {joint:.3f}",
            "no MLP probe"
            if mlp is None
            else f"MLP probe R² on NonlinearError {mlp.r2_nonlinear_mean_over_dims:.3f}",
        ]
        return f"{result.target}: " + "; ".join(parts)


def _predictors(ctx: StudyContext, res: EarlierLayersStepResult, regressors: dict[str, Any]) -> None:
    """The regressions and, when they ran, the joint map's CE on the held-out contexts."""
    target_sae, probe = ctx.saes[res.target], ctx.probe(res.target)
    try:
        res.predictors = earlier_layer_predictors(
            ctx.store,
            target_sae,
            probe,
            regressors,
            split=ctx.split,
            interval_blocks=ctx.cfg.engine.interval_blocks,
            device=ctx.device,
            dtype=ctx.sae_dtype,
            progress=ctx.progress("earlier layers"),
            ranks=ctx.ranks,
        )
    except DataError as exc:  # e.g. too few tokens for the joint regression: say so, keep the run going
        res.notes.append(str(exc))
        ctx.log(f"earlier layers: skipped ({exc})")
        return
    joint_map = res.predictors.joint_map
    assert joint_map is not None
    res.joint_ce = downstream_ce_with_joint(
        ctx.lm,
        held_out_tokens(ctx, ctx.cfg.earlier_layers.ce_contexts),
        target_sae,
        regressors,
        joint_map,
        start=ctx.cfg.text.skip_positions,
        probe=probe,
        progress=ctx.progress("CE with the joint map", "ctx"),
        dtype=ctx.sae_dtype,  # on the model's device, as the downstream CE
        ranks=ctx.ranks,
    )


EARLIER_LAYERS = EarlierLayersStep()
