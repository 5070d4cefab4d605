"""Auto-interpretability of the error SAEs' latents (Fig 8): explanations from top-activating windows,
then detection scoring per activation decile and fuzzing, with a local model or an OpenAI-compatible
endpoint as judge. Each component's latents are also written as JSON records to
``interp/latents-<component>.json`` under the run folder (see ``darkmatter.interp.export``). A small seeded
sample of the split SAE's own latents (``interp.sae_latents``) is scored alike into
``interp/latents-sae.json``, so the report's latent cards show them beside the error SAEs'.

Every finished latent is cached, so a run stopped by an endpoint that went down keeps its partial result,
finishes the rest of the study, and resumes where it stopped when run again. Under ``torchrun`` rank 0
collects each component's examples, the ranks share its latents for the judge, and rank 0 writes the
records (see ``_score``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field

from darkmatter.config.schema import StudyConfig
from darkmatter.errors import ConfigError, EndpointError
from darkmatter.experiments.error_saes import component_activations_fn, latent_columns
from darkmatter.interp import (
    AutoInterpResult,
    EndpointJudge,
    LatentExamples,
    LocalJudge,
    collect_examples,
    latent_records,
    run_autointerp,
    write_latent_records,
)
from darkmatter.interp.judges import Judge
from darkmatter.lm.loading import load_lm, resolve_device
from darkmatter.results import Result
from darkmatter.sae import SAE
from darkmatter.store import Batch
from darkmatter.study.context import StudyContext
from darkmatter.study.step import Step
from darkmatter.study.steps.error_saes import ERROR_SAES, ErrorSAEsStepResult, load_error_saes


class AutoInterpStepResult(Result):
    """Auto-interpretability per error component."""

    sae: str = Field(description="The SAE whose error components the scored SAEs were trained on.")
    components: dict[str, AutoInterpResult] = Field(description="Component -> its latents' scores.")
    latents: dict[str, list[int]] = Field(description="Component -> latents asked for.")
    sae_latents: list[int] = Field(
        default_factory=list, description="Latents of the split SAE itself asked for (interp.sae_latents)."
    )
    sae_scores: AutoInterpResult | None = Field(
        default=None,
        description="The split SAE's own sampled latents, scored alike (not part of Fig 8 or the claims); "
        "None when none were asked for.",
    )


SAE_ITSELF = "sae"
"""The label of the split SAE's own latents: their records are ``interp/latents-sae.json``."""


class AutoInterpStep(Step[AutoInterpStepResult]):
    name = "autointerp"
    title = "auto-interpretability of the error SAEs' latents (Fig 8)"
    result_type = AutoInterpStepResult
    needs = (ERROR_SAES,)
    distributed = True  # the latents are dealt to the ranks for the judge; rank 0 collects and writes

    def enabled(self, cfg: StudyConfig) -> bool:
        interp = cfg.error_saes.interp
        return cfg.error_saes.enabled and interp.enabled and interp.judge != "none"

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        interp = {k: v for k, v in cfg.section("error_saes.interp").items() if k != "concurrency"}
        return {"interp": interp, "seed": cfg.seed}  # concurrency changes no result

    def run(self, ctx: StudyContext) -> AutoInterpStepResult:
        name = ctx.result(ERROR_SAES.name, ErrorSAEsStepResult).sae_name
        lead = ctx.ranks.leader  # under torchrun rank 0 alone reads the SAEs and collects the examples
        trained: dict[str, SAE] = {}
        sae: SAE | None = None
        plan: tuple[dict[str, list[int]], list[int]] | None = None
        if lead:
            trained = load_error_saes(ctx)
            chosen = {c: sample_latents(ctx, s.cfg.d_sae, c) for c, s in trained.items()}
            sae = ctx.saes[name]
            plan = chosen, sample_sae_latents(ctx, sae.cfg.d_sae)
        plan = ctx.ranks.broadcast(plan)
        assert plan is not None
        chosen, own = plan
        judge = make_judge(ctx)
        res = AutoInterpStepResult(sae=name, components={}, latents=chosen, sae_latents=own)
        for component in [*chosen, *([SAE_ITSELF] if own else [])]:
            latents = own if component == SAE_ITSELF else chosen[component]
            activations = partial(_activations, ctx, sae, trained, name, component, latents)
            try:
                scored = _score(ctx, activations, component, latents, judge, name)
            except EndpointError as exc:  # raised on every rank alike (the ranks agree on the outcome)
                if lead:
                    ctx.log(f"autointerp ({component}): {exc}")
                res.error = (
                    f"{exc} Every other result and the report are in {ctx.paths.root}; run again to score "
                    "the remaining latents (finished ones are cached)."
                )
                break
            if component == SAE_ITSELF:
                res.sae_scores = scored
            else:
                res.components[component] = scored
            if lead:
                _log_scored(ctx, name, component, scored)
        return res if lead else AutoInterpStepResult(sae=name, components={}, latents={})

    def headline(self, result: AutoInterpStepResult) -> str:
        bal = [
            f"{c} {v.summary.balanced_accuracy:.2f}"
            for c, v in result.components.items()
            if v.summary.balanced_accuracy is not None
        ]
        fuzz = [
            f"{c} {v.fuzzing.balanced_accuracy:.2f}"
            for c, v in result.components.items()
            if v.fuzzing is not None and v.fuzzing.balanced_accuracy is not None
        ]
        head = "detection " + (", ".join(bal) if bal else "unscored (judge answers unparsed)")
        own = result.sae_scores
        if own is not None and own.summary.balanced_accuracy is not None:
            head += f", SAE itself {own.summary.balanced_accuracy:.2f}"
        return head + (f"; fuzzing {', '.join(fuzz)}" if fuzz else "")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _records_path(ctx: StudyContext, component: str) -> Path:
    """Where a component's latent records are written: ``interp/latents-<component>.json``."""
    return ctx.paths.root / "interp" / f"latents-{component}.json"


_Collect = tuple[Callable[[Batch], torch.Tensor], int, str]
"""What examples are collected from: an activations function of the chosen latents, the SAE's width and
its hook site."""


def _activations(
    ctx: StudyContext, sae: SAE | None, trained: dict[str, SAE], name: str, component: str, latents: list[int]
) -> _Collect:
    """Rank 0: the activations of ``component``'s chosen ``latents``, with the width and site they need."""
    assert sae is not None
    site = str(sae.cfg.hook_site)
    if component == SAE_ITSELF:
        return sae_activations_fn(sae, latents), sae.cfg.d_sae, site
    acts_fn = component_activations_fn(
        sae, ctx.probe(name), trained[component], component, latents, device=ctx.device, dtype=ctx.sae_dtype
    )
    return acts_fn, trained[component].cfg.d_sae, site


def _log_scored(ctx: StudyContext, sae_name: str, component: str, scored: AutoInterpResult) -> None:
    s, f = scored.summary, scored.fuzzing
    fuzz = "" if f is None else f", fuzzing {_fmt(f.balanced_accuracy)}"
    what = f"{sae_name} itself" if component == SAE_ITSELF else f"{component} error"
    ctx.log(
        f"autointerp ({what}): {s.n_latents} latents scored, balanced accuracy "
        f"{_fmt(s.balanced_accuracy)}{fuzz}, {len(scored.skipped)} skipped; latent records in "
        f"{_records_path(ctx, component)}"
    )


def _score(
    ctx: StudyContext,
    activations: Callable[[], _Collect],
    component: str,
    latents: list[int],
    judge: Judge,
    sae_name: str = "",
) -> AutoInterpResult:
    """Examples of each latent from the store (by the activations function ``activations()`` builds), then
    explanations, detection and fuzzing from the judge; the latents' records are written to
    ``_records_path`` (also when all came from the cache).

    Under ``torchrun`` rank 0 collects the examples of all the latents, exactly as one process does (a
    latent's never-firing samples come from one random stream shared by all the latents, so no rank could
    collect its share alone), and sends them to every rank; the latents are then dealt to the ranks for the
    judge (``run_autointerp``), and rank 0 writes the records."""
    icfg, ranks = ctx.cfg.error_saes.interp, ctx.ranks
    examples: dict[int, LatentExamples] | None = None
    site, d_sae = "", 0
    if ranks.leader:
        acts_fn, d_sae, site = activations()
        examples = collect_examples(
            ctx.store,
            acts_fn,
            latents,
            d_sae=d_sae,
            n_top=icfg.n_examples_explain,
            n_per_decile=icfg.n_per_decile,
            n_negatives=icfg.n_negatives,
            window=icfg.window,
            min_activations=icfg.min_activations,
            sites=[site],
            seed=ctx.cfg.seed,
            device=ctx.device,
        )
    examples = ranks.broadcast(examples)
    assert examples is not None
    tokenizer = ctx.tokenizer[0]  # the model's; its weights are not needed for decoding

    def decode(ids: list[int]) -> list[str]:
        return [tokenizer.decode([i]) for i in ids]

    result = run_autointerp(
        examples,
        judge,
        decode,
        seed=ctx.cfg.seed,
        n_examples_explain=icfg.n_examples_explain,
        n_per_decile=icfg.n_per_decile,
        n_negatives=icfg.n_negatives,
        batch_size=icfg.batch_size,
        explain_max_tokens=icfg.explain_max_tokens,
        fuzzing=icfg.fuzzing,
        concurrency=icfg.concurrency,
        cache_path=ctx.paths.error_saes / f"autointerp-{component}.json",
        progress=ctx.progress(f"auto-interp ({component})", "latent"),
        ranks=ranks,
    )
    if ranks.leader:
        meta = {"sae": sae_name, "site": site, "component": component, "d_sae": d_sae}
        write_latent_records(_records_path(ctx, component), latent_records(result, examples, decode, meta))
    return result


def sample_latents(ctx: StudyContext, d_sae: int, component: str) -> list[int]:
    """The configured latents (checked), or a seeded sample of ``n_latents`` of the ``d_sae``."""
    icfg = ctx.cfg.error_saes.interp
    if icfg.latents:
        bad = [i for i in icfg.latents if not 0 <= i < d_sae]
        if bad:
            raise ConfigError(
                f"error_saes.interp.latents has {bad[:5]} outside the {d_sae} latents of the SAE trained on "
                f"the {component} error."
            )
        return list(dict.fromkeys(icfg.latents))
    if icfg.n_latents > d_sae:
        raise ConfigError(
            f"error_saes.interp.n_latents={icfg.n_latents} asks for more latents than the SAE trained on the "
            f"{component} error has ({d_sae}); lower it."
        )
    rng = np.random.default_rng([ctx.cfg.seed, 7])
    return sorted(rng.choice(d_sae, size=icfg.n_latents, replace=False).tolist())


def sample_sae_latents(ctx: StudyContext, d_sae: int) -> list[int]:
    """A seeded sample of ``interp.sae_latents`` of the split SAE's ``d_sae`` latents (sorted)."""
    n = ctx.cfg.error_saes.interp.sae_latents
    if n > d_sae:
        raise ConfigError(
            f"error_saes.interp.sae_latents={n} asks for more latents than the split SAE has ({d_sae}); "
            "lower it."
        )
    rng = np.random.default_rng([ctx.cfg.seed, 11])
    return sorted(rng.choice(d_sae, size=n, replace=False).tolist())


PRE_ACTIVATION_ELEMENTS = 1 << 26
"""Largest ``[tokens, d_sae]`` pre-activation block ``sae_activations_fn`` encodes at once (256 MiB)."""


def sae_activations_fn(sae: SAE, latents: Sequence[int]) -> Callable[[Batch], torch.Tensor]:
    """A function from a store batch to ``[n, len(latents)]`` float32 host activations of ``sae``'s
    chosen latents, encoded (sparsely, on the SAE's device) from ``batch.acts[sae.cfg.hook_site]``."""
    site = sae.cfg.hook_site
    if site is None:
        raise ConfigError("The SAE names no hook site, so its activations cannot be found in a batch.")
    columns = latent_columns(latents, sae.cfg.d_sae)
    chunk = max(1, PRE_ACTIVATION_ELEMENTS // sae.cfg.d_sae)

    @torch.no_grad()
    def activations(batch: Batch) -> torch.Tensor:
        return columns(sae.encode_sparse(batch.acts[site], chunk_size=chunk))

    return activations


def make_judge(ctx: StudyContext) -> Judge:
    """The configured judge: an OpenAI-compatible endpoint, the study's own model, or another local one."""
    icfg, model = ctx.cfg.error_saes.interp, ctx.cfg.model
    if icfg.judge == "endpoint":
        if not icfg.endpoint_url or not icfg.endpoint_model:
            raise ConfigError(
                "error_saes.interp.judge='endpoint' needs endpoint_url (e.g. http://127.0.0.1:8000/v1) and "
                "endpoint_model."
            )
        return EndpointJudge(
            icfg.endpoint_url, icfg.endpoint_model, timeout=icfg.timeout, retries=icfg.retries
        )
    dtype = icfg.local_dtype or model.dtype
    if icfg.local_model == model.name and dtype == model.dtype and resolve_device(model.device) == ctx.device:
        return LocalJudge.from_lm(ctx.lm, constrained=icfg.constrained)
    # another model, precision or device: a judge of its own, on the study's (analysis) device
    judge_lm = load_lm(icfg.local_model, device=str(ctx.device), dtype=dtype, online=model.online or None)
    return LocalJudge.from_lm(judge_lm, constrained=icfg.constrained)


AUTOINTERP = AutoInterpStep()
