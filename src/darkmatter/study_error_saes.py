"""The error-component steps of ``darkmatter run``: SAEs trained on LinearError and NonlinearError of one
SAE (paper Figs 7/8), then auto-interpretability of their latents with a judge model.

Both steps skip when their outputs match the config. Auto-interpretation caches every finished latent, so a
killed run, or one stopped by an endpoint that went down, resumes where it stopped; the endpoint's error is
raised after the report is written, so every other result of the run is kept.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ConfigDict, Field

from darkmatter.errors import ConfigError, EndpointError
from darkmatter.results import Result, config_hash, read_result, write_result
from darkmatter.sae import SAE, load_sae, save_sae
from darkmatter.store import ActivationStore

if TYPE_CHECKING:
    from darkmatter.interp.judges import Judge
    from darkmatter.pipeline import Study

DECILE_LABELS = ["Not"] + [f"Q{i}" for i in range(1, 11)]


class AutoInterpStudyResult(Result):
    """Auto-interpretability per error component (each an ``AutoInterpResult``) plus its figure."""

    model_config = ConfigDict(extra="allow")
    sae: str = Field(description="The SAE whose error components the scored SAEs were trained on.")
    components: dict[str, dict[str, Any]] = Field(description="Component -> AutoInterpResult.")
    latents: dict[str, list[int]] = Field(description="Component -> latents asked for.")
    figures: dict[str, dict[str, str]] = Field(default_factory=dict)


def _folder(study: Study) -> Path:
    return study.out / "error_saes"


def run_error_saes_step(
    study: Study, store: ActivationStore, saes: dict[str, SAE]
) -> tuple[str, tuple[Any, Any], dict[str, SAE]] | None:
    """Train (or load) the error-component SAEs; returns (SAE name, its probe, {component: SAE})."""
    from darkmatter.experiments.error_saes import train_error_saes
    from darkmatter.pipeline import WithFigures, load_probe
    from darkmatter.report import figures as fg

    ecfg = study.cfg.error_saes
    if not ecfg.enabled:
        return None
    name = study.chosen_sae(saes, ecfg.sae, "error_saes.sae")
    sae = saes[name]
    probe_path = study.out / "probes" / f"{name}.safetensors"
    if not probe_path.is_file():
        raise ConfigError(f"error_saes.sae {name!r} has no error probe; the engine step must run first.")
    probe = load_probe(probe_path)
    d_sae = ecfg.d_sae or sae.cfg.d_sae
    k = ecfg.k or sae.cfg.k or study.cfg.family.k
    settings = ecfg.model_dump(exclude={"interp"}) | {"sae": name}
    key = study.family_hash() + ":engine-v1:" + config_hash(settings)
    folder = _folder(study)
    done = read_result(study.out, "error_saes", Result)
    paths = {c: folder / c for c in ecfg.components}
    if done is not None and done.config_hash == key and all(p.is_dir() for p in paths.values()):
        study.log("error-component SAEs: up to date")
        return name, probe, {c: load_sae(p) for c, p in paths.items()}
    bar = study.progress("train error SAEs")
    res, trained = train_error_saes(
        store,
        sae,
        probe,
        components=tuple(ecfg.components),
        d_sae=d_sae,
        k=k,
        train=ecfg.train,
        workdir=folder / ".training",
        split_seed=study.cfg.split_seed,
        train_fraction=study.cfg.train_fraction,
        progress=bar,
    )
    for c, s in trained.items():
        save_sae(s, paths[c])
    trained = {c: load_sae(p) for c, p in paths.items()}  # exactly what a resumed run will load
    curves = {
        f"SAE on {c} error": [(float(h["step"]), float(h["fvu"])) for h in res.curves.get(c, [])]
        for c in ecfg.components
    }
    figs = {
        "curves": study._rel(fg.plot_training_curves(curves, study.out / "figures", stem="error_sae_curves"))
    }
    data = res.model_dump() | {
        "config_hash": key,
        "seed": study.cfg.seed,
        "sae_name": name,
        "figures": figs,
    }
    write_result(study.out, WithFigures.model_validate(data))
    for c in ecfg.components:
        q = res.saes[c]
        study.log(f"error SAE on {c} error of {name}: held-out FVU {q.fvu:.3f}, L0 {q.l0:.1f}")
    return name, probe, trained


def _latents(n_latents: int, chosen: list[int], d_sae: int, seed: int, component: str) -> list[int]:
    if chosen:
        bad = [i for i in chosen if not 0 <= i < d_sae]
        if bad:
            raise ConfigError(
                f"error_saes.interp.latents has {bad[:5]} outside the {d_sae} latents of the SAE trained on "
                f"the {component} error."
            )
        return list(dict.fromkeys(chosen))
    if n_latents > d_sae:
        raise ConfigError(
            f"error_saes.interp.n_latents={n_latents} asks for more latents than the SAE trained on the "
            f"{component} error has ({d_sae}); lower it."
        )
    rng = np.random.default_rng([seed, 7])
    return sorted(rng.choice(d_sae, size=n_latents, replace=False).tolist())


def _judge(study: Study) -> Judge:
    from darkmatter.interp import EndpointJudge, LocalJudge

    icfg = study.cfg.error_saes.interp
    if icfg.judge == "endpoint":
        if not icfg.endpoint_url or not icfg.endpoint_model:
            raise ConfigError(
                "error_saes.interp.judge='endpoint' needs endpoint_url (e.g. http://127.0.0.1:8000/v1) and "
                "endpoint_model."
            )
        return EndpointJudge(
            icfg.endpoint_url, icfg.endpoint_model, timeout=icfg.timeout, retries=icfg.retries
        )
    if icfg.judge != "local":
        raise ConfigError(
            f"error_saes.interp.judge must be 'local', 'endpoint' or 'none', not {icfg.judge!r}."
        )
    if icfg.local_model == study.cfg.model.name:
        return LocalJudge.from_lm(study.lm)
    from darkmatter.lm.loading import load_lm

    m = study.cfg.model
    return LocalJudge.from_lm(
        load_lm(icfg.local_model, device=m.device, dtype=m.dtype, online=m.online or None)
    )


def run_autointerp_step(
    study: Study, store: ActivationStore, saes: dict[str, SAE], name: str, probe: Any, trained: dict[str, SAE]
) -> None:
    """Explain and score a sample of each error SAE's latents; the detection figure when both are there."""
    from darkmatter.experiments.error_saes import component_activations_fn
    from darkmatter.interp import collect_examples, run_autointerp
    from darkmatter.report import figures as fg

    ecfg = study.cfg.error_saes
    icfg = ecfg.interp
    if not icfg.enabled or icfg.judge == "none":
        return
    done = read_result(study.out, "error_saes", Result)
    assert done is not None
    key = done.config_hash + ":" + config_hash(icfg.model_dump())
    prior = read_result(study.out, "autointerp", Result)
    if prior is not None and prior.config_hash == key and not getattr(prior, "error", None):
        study.log("auto-interpretability: up to date")
        return
    sae = saes[name]
    chosen = {
        c: _latents(icfg.n_latents, icfg.latents, s.cfg.d_sae, study.cfg.seed, c) for c, s in trained.items()
    }
    judge = _judge(study)
    tok = study.lm.tokenizer

    def decode(ids: list[int]) -> list[str]:
        return [tok.decode([i]) for i in ids]

    results: dict[str, dict[str, Any]] = {}
    failure: EndpointError | None = None
    for c, esae in trained.items():
        latents = chosen[c]
        examples = collect_examples(
            store,
            component_activations_fn(sae, probe, esae, c, latents),
            latents,
            d_sae=esae.cfg.d_sae,
            n_top=icfg.n_examples_explain,
            n_per_decile=icfg.n_per_decile,
            n_negatives=icfg.n_negatives,
            window=icfg.window,
            min_activations=icfg.min_activations,
            sites=[str(sae.cfg.hook_site)],
            seed=study.cfg.seed,
        )
        bar = study.progress(f"auto-interp ({c})", "latent")

        t_start = time.perf_counter()

        def report(i: int, total: int, _latent: int, bar: Any = bar, t_start: float = t_start) -> None:
            if bar is not None:
                bar(i, total, i / max(time.perf_counter() - t_start, 1e-9))

        try:
            res = run_autointerp(
                examples,
                judge,
                decode,
                seed=study.cfg.seed,
                n_examples_explain=icfg.n_examples_explain,
                n_per_decile=icfg.n_per_decile,
                n_negatives=icfg.n_negatives,
                batch_size=icfg.batch_size,
                explain_max_tokens=icfg.explain_max_tokens,
                cache_path=_folder(study) / f"autointerp-{c}.json",
                progress=report,
            )
        except EndpointError as exc:
            failure = exc
            study.log(f"auto-interpretability ({c}): {exc}")
            break
        results[c] = res.model_dump()
        s = res.summary
        bal = "n/a" if s.balanced_accuracy is None else f"{s.balanced_accuracy:.2f}"
        study.log(
            f"auto-interpretability ({c} error): {s.n_latents} latents scored, balanced accuracy {bal}, "
            f"{len(res.skipped)} skipped"
        )
    figs: dict[str, dict[str, str]] = {}
    if failure is None and {"linear", "nonlinear"} <= set(results):
        acc: dict[str, list[float]] = {}
        ci: dict[str, list[tuple[float, float]]] = {}
        for c in ("linear", "nonlinear"):
            summ = results[c]["summary"]
            props = [summ["negatives"], *summ["deciles"]]
            acc[c] = [np.nan if p["accuracy"] is None else p["accuracy"] for p in props]
            ci[c] = [(np.nan, np.nan) if p["ci_low"] is None else (p["ci_low"], p["ci_high"]) for p in props]
        figs["detection"] = study._rel(
            fg.plot_detection_accuracy(
                DECILE_LABELS,
                acc["linear"],
                acc["nonlinear"],
                ci["linear"],
                ci["nonlinear"],
                study.out / "figures",
            )
        )
    out = AutoInterpStudyResult(
        experiment="autointerp",
        config_hash=key,
        seed=study.cfg.seed,
        config={"interp": icfg.model_dump(), "sae": name},
        sae=name,
        components=results,
        latents=chosen,
        figures=figs,
    )
    data = out.model_dump()
    if failure is not None:
        data["error"] = str(failure)
    write_result(study.out, AutoInterpStudyResult.model_validate(data))
    if failure is not None:
        study.deferred_errors.append(
            EndpointError(
                f"{failure} Every other result and the report are in {study.out}; run again to score the "
                "remaining latents (finished ones are cached)."
            )
        )
