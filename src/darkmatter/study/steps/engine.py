"""The engine: both passes over the store for every SAE of the family (Figs 1-3, 6 and 14).

Writes the error probes b* (``probes/``), the per-token table (``tables/tokens.parquet``) and the
per-token norm Grams (``engine/norm_grams.safetensors``) that the per-token and error-component steps read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from darkmatter import atomic
from darkmatter.config.schema import StudyConfig
from darkmatter.experiments.decomposition import NormGram, decompose
from darkmatter.experiments.decomposition.accumulators import n_blocks
from darkmatter.experiments.error_prediction import scaling_law
from darkmatter.experiments.probe_latents import probe_latents
from darkmatter.results import Number, Result
from darkmatter.study.budget import describe_groups
from darkmatter.study.context import StudyContext
from darkmatter.study.probes import save_probe
from darkmatter.study.readable import parquet_ok, safetensors_ok
from darkmatter.study.step import Step
from darkmatter.study.steps.family import FAMILY


class SAEErrorStats(BaseModel):
    """What the engine measures for one SAE, on held-out tokens (see ``SAEStats``)."""

    name: str
    site: str
    d_sae: int
    k: int | None
    fvu: Number
    nmse: Number
    l0: Number
    dead_fraction: Number
    norm_ratio: Number
    vector_r2: Number
    vector_r2_weighted: Number
    vector_r2_nobias: Number
    fvu_nonlinear: Number
    fvu_nonlinear_nobias: Number
    fvu_nonlinear_pass2: Number
    norm_r2: Number
    norm_r2_plain: Number
    norm_r2_nobias: Number
    cos_linear_x: Number
    ridge: Number
    constant_dims: int
    mean_error_norm: Number
    mean_linear_norm: Number
    mean_nonlinear_norm: Number
    norm_test: dict[str, Number] = Field(description="Fig 6: quantity -> R² of x̃ -> ‖q‖².")
    intervals: dict[str, list[Number]] = Field(
        default_factory=dict,
        description="Main-site SAEs: fvu, fvu_nonlinear, vector_r2, norm_r2 -> [low, high], 95% jackknife "
        "over blocks of contexts, every probe refitted per replicate.",
    )
    jackknife: dict[str, list[Number]] = Field(
        default_factory=dict, description="The same numbers with each block of contexts left out in turn."
    )


class Estimate(BaseModel):
    """A bootstrap estimate: full-data point, bootstrap mean and std, percentile interval."""

    point: Number
    mean: Number
    std: Number
    low: Number
    high: Number


class PowerLawFit(BaseModel):
    c: Number
    a: Number
    m: Number
    rmse: Number
    converged: bool


class PowerLaw(BaseModel):
    """FVU(W) = c + a·W^-m over the width sweep, with a bootstrap over contexts."""

    widths: list[float]
    fit: PowerLawFit
    c: Estimate
    a: Estimate
    m: Estimate
    fvu: list[Estimate]
    samples: list[list[float]]
    n_converged: int
    n_boot: int
    ci: float
    seed: int


class ProbeLatents(BaseModel):
    """Fig 14: norm probe directions against latent activation statistics."""

    sae: str
    probe_r2: Number
    correlation: Number = Field(description="Pearson r of probe·direction vs E[w²]/E[w] over latents.")
    correlation_mean: Number = Field(description="Pearson r of probe·direction vs E[w] when active.")
    n_latents: int
    probe_dot: list[float]
    mean_active: list[float]


class EngineResult(Result):
    """Figs 1-3 (error probes, FVU_nonlinear, the scaling law), Fig 6 (norm prediction), Fig 14."""

    saes: list[SAEErrorStats] = Field(description="Per SAE of the family, held-out tokens.")
    width_sweep: list[str] = Field(description="SAE names of the width sweep at fixed k, by width.")
    k_sweep: list[str] = Field(description="SAE names of the k sweep at fixed width, by L0.")
    power_law: PowerLaw | None = None
    fvu_nonlinear_mean: float | None = Field(None, description="Mean FVU_nonlinear over the width sweep.")
    fvu_nonlinear_ci: list[float] | None = Field(None, description="Bootstrap 95% CI of that mean.")
    norm_quantities: list[str] = Field(description="Fig 6's components q, in order.")
    probe_latents: ProbeLatents
    n_train: int
    n_test: int

    def sae(self, name: str) -> SAEErrorStats:
        return next(s for s in self.saes if s.name == name)


class EngineStep(Step[EngineResult]):
    name = "engine"
    title = "error prediction, FVU_nonlinear and the scaling law (Figs 1-3, 6, 14)"
    result_type = EngineResult
    needs = (FAMILY,)
    version = 4  # 4: pass 2 applies b* in float64
    distributed = True

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {"seed": cfg.seed, "engine": cfg.section("engine")}

    def is_current(self, ctx: StudyContext, result: EngineResult) -> bool:
        tensors = [norm_grams_path(ctx)] + [ctx.paths.probe(s.name) for s in result.saes]
        return parquet_ok(ctx.paths.token_table) and all(safetensors_ok(p) for p in tensors)

    def run(self, ctx: StudyContext) -> EngineResult:
        saes, roles = ctx.saes, ctx.roles
        blocks = n_blocks(ctx.store, ctx.cfg.engine.interval_blocks)
        # rank 0's grouping on every rank (budgets are detected per process; the passes are collectives)
        groups = ctx.ranks.broadcast(ctx.sae_groups(list(saes), what="engine", blocks=blocks))
        if len(groups) > 1:
            ctx.log(f"engine: SAEs streamed in {describe_groups(groups)} to fit the device memory budget")
        dec = decompose(
            ctx.store,
            saes,
            split=ctx.split,
            device=ctx.device,
            table_path=ctx.paths.token_table,
            progress=ctx.progress("engine (2 passes)"),
            interval_site=roles.main_site if roles.width_sweep else None,
            interval_blocks=ctx.cfg.engine.interval_blocks,
            groups=groups,
            release=saes.release,
            ranks=ctx.ranks,
        )
        if ctx.ranks.leader:
            for name, (weights, bias) in dec.probes.items():
                save_probe(ctx.paths.probe(name), weights.float(), bias.float())
            save_norm_grams(norm_grams_path(ctx), dec.norm_grams)
        fit, nl_mean, nl_ci = scaling_law(
            dec,
            roles.width_sweep,
            roles.main_site,
            seed=ctx.cfg.seed,
            n_boot=ctx.cfg.engine.power_law_boot,
            ranks=ctx.ranks,
        )
        # one pass of one SAE, made by every rank over the whole store: its regression coefficients are
        # ill-conditioned, so sums added in another order would move them (1.6e-9 relative on the tiny study)
        latents = probe_latents(
            ctx.store, saes[roles.widest], split=ctx.split, device=ctx.device, dtype=ctx.sae_dtype
        )
        saes.release([roles.widest])
        for n in roles.width_sweep + [n for n in roles.k_sweep if n not in roles.width_sweep]:
            s = dec.stats[n]
            ctx.log(
                f"engine: {n:<24} FVU {s.fvu:.3f} FVU_nl {s.fvu_nonlinear:.3f} vecR2 {s.vector_r2:.3f} "
                f"normR2 {s.norm_r2:.3f}"
            )
        return EngineResult(
            saes=[SAEErrorStats.model_validate(dec.stats[n].to_dict()) for n in saes],
            width_sweep=roles.width_sweep,
            k_sweep=roles.k_sweep,
            power_law=PowerLaw.model_validate(fit) if fit else None,
            fvu_nonlinear_mean=nl_mean,
            fvu_nonlinear_ci=nl_ci,
            norm_quantities=list(next(iter(dec.stats.values())).norm_test),
            probe_latents=ProbeLatents(sae=roles.widest, **latents),
            n_train=dec.n_train,
            n_test=dec.n_test,
        )

    def headline(self, result: EngineResult) -> str:
        vec = [s.vector_r2 for s in result.saes]
        nl = [result.sae(n).fvu_nonlinear for n in result.width_sweep]
        text = f"vector R² {min(vec):.2f}-{max(vec):.2f}"
        return text + (f", FVU_nonlinear {min(nl):.3f}-{max(nl):.3f}" if nl else "")


def norm_grams_path(ctx: StudyContext) -> Path:
    return ctx.paths.engine / "norm_grams.safetensors"


def save_norm_grams(path: Path, grams: dict[str, NormGram]) -> None:
    """The per-token norm Grams of each site (float64, exact) with their column names."""
    tensors, columns = {}, {}
    for site, gram in grams.items():
        tensors[f"{site}/train"] = torch.from_numpy(gram.train)
        tensors[f"{site}/test"] = torch.from_numpy(gram.test)
        for b, (train, test) in enumerate(gram.blocks):
            tensors[f"{site}/block{b}/train"] = torch.from_numpy(train)
            tensors[f"{site}/block{b}/test"] = torch.from_numpy(test)
        columns[site] = gram.columns
    atomic.write_bytes(path, st_save(tensors, metadata={"columns": json.dumps(columns)}))


def load_norm_grams(path: Path) -> dict[str, NormGram]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        columns: dict[str, list[str]] = json.loads((f.metadata() or {})["columns"])
    tensors = load_file(str(path))
    grams = {}
    for site, cols in columns.items():
        blocks: list[tuple[np.ndarray, np.ndarray]] = []
        while f"{site}/block{len(blocks)}/train" in tensors:
            b = len(blocks)
            blocks.append(
                (tensors[f"{site}/block{b}/train"].numpy(), tensors[f"{site}/block{b}/test"].numpy())
            )
        grams[site] = NormGram(
            cols, tensors[f"{site}/train"].numpy(), tensors[f"{site}/test"].numpy(), blocks
        )
    return grams


ENGINE = EngineStep()
