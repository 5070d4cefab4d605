"""The steps of a study, one module each, in the order they run (each after the steps it needs).

| step | writes | paper |
| --- | --- | --- |
| harvest | the activation store | |
| family | the SAE family and its held-out quality | |
| engine | error probes, FVU_nonlinear, scaling law, norm prediction, norm probe | Figs 1-3, 6, 14 |
| per_token | per-token scaling between widths | Figs 4, 5, 12, 16 |
| layer_sweep | error-norm baselines across layers | Figs 3, 13 |
| synthetic | the synthetic simulation | Table 1, Fig 15, App. D |
| pursuit | gradient pursuit, encoder error | Figs 1, 10a |
| downstream_ce | CE with spliced reconstructions | Figs 8, 9 |
| earlier_layers | earlier-layer predictors, joint-map CE, MLP probe | Figs 9b, 10b |
| error_saes | SAEs trained on LinearError and NonlinearError | Figs 7, 8 |
| autointerp | explanations and detection scores of their latents | Fig 8 |
"""

from __future__ import annotations

from typing import Any

from darkmatter.study.step import Step
from darkmatter.study.steps.autointerp import AUTOINTERP
from darkmatter.study.steps.downstream_ce import DOWNSTREAM_CE
from darkmatter.study.steps.earlier_layers import EARLIER_LAYERS
from darkmatter.study.steps.engine import ENGINE
from darkmatter.study.steps.error_saes import ERROR_SAES
from darkmatter.study.steps.family import FAMILY
from darkmatter.study.steps.harvest import HARVEST
from darkmatter.study.steps.layer_sweep import LAYER_SWEEP
from darkmatter.study.steps.per_token import PER_TOKEN
from darkmatter.study.steps.pursuit import PURSUIT
from darkmatter.study.steps.synthetic import SYNTHETIC

STEPS: tuple[Step[Any], ...] = (
    HARVEST,
    FAMILY,
    ENGINE,
    PER_TOKEN,
    LAYER_SWEEP,
    SYNTHETIC,
    PURSUIT,
    DOWNSTREAM_CE,
    EARLIER_LAYERS,
    ERROR_SAES,
    AUTOINTERP,
)
STEP_NAMES = tuple(s.name for s in STEPS)

__all__ = ["STEPS", "STEP_NAMES"]
