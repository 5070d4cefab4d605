"""Downstream cross-entropy (Figs 8, 9): Sae(x) and each error component spliced back into the model on
held-out contexts that were never harvested.

Under ``torchrun`` every rank loads the model and the SAEs and splices its share of whole batches of the
held-out contexts; the sums meet and every rank computes the result (rank 0's is written). The SAE groups
(the device memory budget) are rank 0's, so every rank walks the same groups in the same order."""

from __future__ import annotations

from typing import Any

from darkmatter.config.schema import StudyConfig
from darkmatter.experiments.downstream import DownstreamResult, downstream_ce
from darkmatter.hashing import stable_hash
from darkmatter.study.budget import describe_groups
from darkmatter.study.context import StudyContext
from darkmatter.study.step import Step
from darkmatter.study.steps.engine import ENGINE
from darkmatter.text import held_out_contexts


def held_out_tokens(ctx: StudyContext, n_contexts: int | None = None) -> Any:
    """The held-out contexts of the CE splices ``[n, ctx_len]`` (shared with the earlier-layer step, which
    may take fewer: the first ``n_contexts``)."""
    lm = ctx.lm
    n = ctx.cfg.downstream_ce.n_contexts if n_contexts is None else n_contexts
    return held_out_contexts(ctx.cfg.text, lm.tokenizer, lm.bos_token_id, n)


BOTH_BATCHES = 2
"""The sae+both exactness check runs on the first 2 batches (8 contexts): on every batch it would cost one
spliced pass per SAE and context, a fifth of the step, to re-check an identity."""


class DownstreamCEStep(Step[DownstreamResult]):
    name = "downstream_ce"
    title = "downstream CE with spliced reconstructions (Figs 8, 9)"
    result_type = DownstreamResult
    needs = (ENGINE,)
    version = 3
    distributed = True

    def enabled(self, cfg: StudyConfig) -> bool:
        return cfg.downstream_ce.enabled

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {"downstream_ce": cfg.section("downstream_ce"), "seed": cfg.seed}

    def run(self, ctx: StudyContext) -> DownstreamResult:
        names = ctx.roles.width_sweep
        tokens = held_out_tokens(ctx)
        model_bytes = sum(p.numel() * p.element_size() for p in ctx.lm.model.parameters())
        fixed = model_bytes if next(ctx.lm.model.parameters()).device == ctx.device else 0
        parts = []
        # each rank measures its own free memory: rank 0's groups for all, so the collectives pair up
        groups = ctx.ranks.broadcast(ctx.sae_groups(names, what="downstream CE", blocks=0, fixed_bytes=fixed))
        if len(groups) > 1:
            ctx.log(
                f"downstream_ce: SAEs spliced in {describe_groups(groups)} to fit the device memory budget"
            )
        for group in groups:
            parts.append(
                downstream_ce(
                    ctx.lm,
                    tokens,
                    {n: ctx.saes[n] for n in group},
                    {n: ctx.probe(n) for n in group},
                    start=ctx.cfg.text.skip_positions,
                    both_batches=BOTH_BATCHES,
                    progress=ctx.progress("downstream CE", "ctx"),  # rank 0's share under torchrun
                    seed=ctx.cfg.seed,
                    dtype=ctx.sae_dtype,  # the splices run on the model's device; SAEs and probes go there
                    ranks=ctx.ranks,
                )
            )
            ctx.saes.release(group)
        return merge_groups(parts)

    def headline(self, result: DownstreamResult) -> str:
        def share(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.2f}"

        rows = result.saes.values()
        pairs = ", ".join(f"{share(r.ce_recovered_linear)}/{share(r.ce_recovered_nonlinear)}" for r in rows)
        return "CE recovered lin/nonlin " + pairs


DOWNSTREAM_CE = DownstreamCEStep()


def merge_groups(parts: list[DownstreamResult]) -> DownstreamResult:
    """The result of SAEs spliced group by group, as one run over every SAE would record it: each SAE's
    numbers depend only on the model, the tokens and that SAE; the clean CE is the same in every group."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    config = dict(first.config)
    config["saes"] = {name: sae for p in parts for name, sae in p.config["saes"].items()}
    return first.model_copy(
        update={
            "config": config,
            "config_hash": stable_hash(config),
            "saes": {name: row for p in parts for name, row in p.saes.items()},
            "forward_passes": sum(p.forward_passes for p in parts),
            "seconds": sum(p.seconds for p in parts),
        }
    )
