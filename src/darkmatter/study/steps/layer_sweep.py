"""Figs 3 and 13: one small SAE per layer, and the R² of its squared error norm from five predictors
(activations, token identity, L0, activation norm, model loss). Harvests its own store of resid_post.
Under torchrun every rank runs it (``layer_baselines.run`` with the ranks) and gets the same result."""

from __future__ import annotations

from typing import Any

from darkmatter.config.schema import StudyConfig
from darkmatter.experiments import layer_baselines
from darkmatter.experiments.layer_baselines import LayerBaselinesResult
from darkmatter.sae.train_logs import TrainLogs
from darkmatter.study.context import StudyContext
from darkmatter.study.step import Step
from darkmatter.text import TextConfig


class LayerSweepStep(Step[LayerBaselinesResult]):
    name = "layer_sweep"
    title = "error-norm baselines across layers (Figs 3, 13)"
    result_type = LayerBaselinesResult
    version = 3
    distributed = True  # harvest, SAE training and sums are shared by the ranks; rank 0 saves the SAEs

    def enabled(self, cfg: StudyConfig) -> bool:
        return cfg.layer_sweep.enabled

    def settings(self, cfg: StudyConfig) -> dict[str, Any]:
        return {
            "model": cfg.section("model"),
            "text": cfg.section("text"),
            "harvest": cfg.section("harvest"),
            "layer_sweep": cfg.section("layer_sweep"),
            "split_seed": cfg.split_seed,
            "train_fraction": cfg.train_fraction,
            "interval_blocks": cfg.engine.interval_blocks,
        }

    def run(self, ctx: StudyContext) -> LayerBaselinesResult:
        cfg, sweep = ctx.cfg, ctx.cfg.layer_sweep
        text = cfg.text.model_copy(update={"n_contexts": min(sweep.n_contexts, cfg.text.n_contexts)})
        with ctx.train_logs("layer_sweep") as logs:
            return self._run(ctx, text, logs)

    def _run(self, ctx: StudyContext, text: TextConfig, logs: TrainLogs | None) -> LayerBaselinesResult:
        cfg, sweep = ctx.cfg, ctx.cfg.layer_sweep
        return layer_baselines.run(
            ctx.lm,
            text,
            sweep.resolve(ctx.lm.identity["n_layers"]),
            ctx.paths.layers,
            d_sae=sweep.d_sae,
            k=sweep.k,
            kind=sweep.kind,
            train=ctx.train_config(sweep.train),
            # the sweep runs every layer anyway: its store always records the per-token loss (Fig 13)
            harvest_cfg=cfg.harvest.model_copy(update={"sites": [], "with_loss": True}),
            split=ctx.split,
            # jackknife blocks of whole shards, as the engine's; the layer store's shards shrink to match
            interval_blocks=cfg.engine.interval_blocks,
            device=ctx.device,
            dtype=ctx.sae_dtype,
            log=ctx.log,
            progress=ctx.progress,
            train_logs=logs,
            ranks=ctx.ranks,
        )

    def headline(self, result: LayerBaselinesResult) -> str:
        acts = result.r2["activations"]
        return f"{len(acts)} layers, R²(activations → ‖e‖²) {min(acts):.2f}-{max(acts):.2f}"


LAYER_SWEEP = LayerSweepStep()
