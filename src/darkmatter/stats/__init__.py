"""Exact streaming statistics: moment accumulators, ridge solve, held-out evaluation, metrics, token split.

`moments` holds the float64 sufficient statistics of every regression, `ridge` the exact fits from them and
`heldout` the evaluation from the test split's own moments; `metrics` the streaming reconstruction metrics
named as in the README's "Metrics", and `split` the seeded per-token train/test split every step shares.
`checks` and `distributed` are the input checks and cross-rank sums the accumulators share.
"""

from __future__ import annotations

from darkmatter.stats.heldout import CONSTANT_TARGET_TOL, HeldOutEval, evaluate, fvu_with_prediction
from darkmatter.stats.metrics import (
    FVU,
    L0,
    NMSE,
    Cosine,
    ExplainedVariance,
    NormRatio,
    ScalarR2,
    StreamingMetric,
)
from darkmatter.stats.moments import Moments
from darkmatter.stats.ridge import DEFAULT_RELATIVE_RIDGE, RidgeFit, fit_ridge, fit_ridge_many
from darkmatter.stats.split import Split, is_train, token_hash

__all__ = [
    "CONSTANT_TARGET_TOL",
    "DEFAULT_RELATIVE_RIDGE",
    "FVU",
    "L0",
    "NMSE",
    "Cosine",
    "ExplainedVariance",
    "HeldOutEval",
    "Moments",
    "NormRatio",
    "RidgeFit",
    "ScalarR2",
    "Split",
    "StreamingMetric",
    "evaluate",
    "fit_ridge",
    "fit_ridge_many",
    "fvu_with_prediction",
    "is_train",
    "token_hash",
]
