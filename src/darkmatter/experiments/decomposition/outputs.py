"""What the engine produces: per-SAE statistics, per-context sums, per-token norm Grams."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

NORM_TEST_QUANTITIES = ("x", "sae", "error", "linear", "nonlinear")
"""The components whose squared norm the norm-prediction test (Fig 6) regresses on x̃."""


@dataclass
class SAEStats:
    """Everything the engine measures for one SAE (all on held-out tokens unless named otherwise)."""

    name: str
    site: str
    d_sae: int
    k: int | None
    fvu: float = float("nan")
    nmse: float = float("nan")
    l0: float = float("nan")
    dead_fraction: float = float("nan")
    norm_ratio: float = float("nan")
    vector_r2: float = float("nan")
    vector_r2_weighted: float = float("nan")
    vector_r2_nobias: float = float("nan")
    fvu_nonlinear: float = float("nan")
    fvu_nonlinear_nobias: float = float("nan")
    fvu_nonlinear_pass2: float = float("nan")
    norm_r2: float = float("nan")
    norm_r2_plain: float = float("nan")
    norm_r2_nobias: float = float("nan")
    cos_linear_x: float = float("nan")
    ridge: float = float("nan")
    constant_dims: int = 0
    mean_error_norm: float = float("nan")
    mean_linear_norm: float = float("nan")
    mean_nonlinear_norm: float = float("nan")
    norm_test: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, list[float]] = field(default_factory=dict)  # metric -> [low, high], 95%
    jackknife: dict[str, list[float]] = field(default_factory=dict)  # metric -> one value per block left out

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ContextSums:
    """Per-context float64 sums over test tokens (for bootstraps over contexts)."""

    n: np.ndarray  # [n_ctx] test tokens
    sum_x: np.ndarray  # [n_ctx, d]
    sum_sq_x: np.ndarray  # [n_ctx] Σ‖x‖²
    sse: dict[str, np.ndarray]  # name -> [n_ctx] Σ‖e‖²
    sse_nonlinear: dict[str, np.ndarray]  # name -> [n_ctx] Σ‖NonlinearError‖²


@dataclass
class NormGram:
    """Raw float64 Gram of per-token scalars z = [columns..., 1] per split (per-token scaling)."""

    columns: list[str]
    train: np.ndarray
    test: np.ndarray
    blocks: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (train, test) per block

    def without(self, block: int) -> NormGram:
        """The Gram of every block but ``block`` (the delete-one jackknife's replicate)."""
        tr, te = self.blocks[block]
        return NormGram(self.columns, self.train - tr, self.test - te)


Probe = tuple[torch.Tensor, torch.Tensor]
"""An error probe b*: (weights [d, d], bias [d]), LinearError(x) = x @ weights + bias."""


@dataclass
class Decomposition:
    """Output of ``decompose``: per-SAE statistics, bootstrap sums per site, per-token norm Grams."""

    stats: dict[str, SAEStats]
    contexts: dict[str, ContextSums]  # site -> sums
    norm_grams: dict[str, NormGram]  # site -> Gram (empty without the second pass)
    n_train: int
    n_test: int
    probes: dict[str, Probe]  # name -> b*
    table: Path | None = None
