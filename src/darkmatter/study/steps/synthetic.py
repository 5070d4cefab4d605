"""Table 1, Fig 15 and the App. D random control: x′ = Sae(x) with latents ablated and noise added."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from darkmatter.config.schema import StudyConfig
from darkmatter.experiments.synthetic import SyntheticResult, synthetic_simulation
from darkmatter.study.context import StudyContext
from darkmatter.study.step import Step
from darkmatter.study.steps.family import FAMILY


class SyntheticStepResult(SyntheticResult):
    """The simulation on one SAE of the family."""

    sae_name: str = Field(description="The family SAE whose latents build x′.")


class SyntheticStep(Step[SyntheticStepResult]):
    name = "synthetic"
    title = "the synthetic simulation (Table 1, Fig 15, App. D)"
    result_type = SyntheticStepResult
    needs = (FAMILY,)
    version = 2

    def enabled(self, cfg: StudyConfig) -> bool:
        return cfg.synthetic.enabled

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {"synthetic": cfg.section("synthetic"), "seed": cfg.seed}

    def run(self, ctx: StudyContext) -> SyntheticStepResult:
        name = ctx.roles.chosen(ctx.cfg.synthetic.sae, "synthetic.sae")
        syn = ctx.cfg.synthetic
        res = synthetic_simulation(
            ctx.store,
            ctx.saes[name],
            n_tokens=syn.n_tokens,
            split=ctx.split,
            seed=ctx.cfg.seed,
            random_control=syn.random_control,
            device=ctx.device,
            dtype=ctx.sae_dtype,
        )
        return SyntheticStepResult(**dict(res), sae_name=name)

    def headline(self, result: SyntheticStepResult) -> str:
        return f"{result.sae_name}: Table 1 diagonal dominant: {result.diagonal_ok}"


SYNTHETIC = SyntheticStep()
