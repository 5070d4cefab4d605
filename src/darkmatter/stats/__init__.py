"""Exact streaming statistics: moment accumulators, ridge solve, held-out evaluation, metrics, token split.

`moments` holds the float64 sufficient statistics of every regression (ARCHITECTURE principle 2),
`metrics` the streaming reconstruction metrics named as in ARCHITECTURE "Metrics", and `split` the seeded
per-token train/test hash (principle 3).
"""

from __future__ import annotations

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
from darkmatter.stats.moments import (
    CONSTANT_TARGET_TOL,
    DEFAULT_RELATIVE_RIDGE,
    HeldOutEval,
    Moments,
    RidgeFit,
    evaluate,
    fit_ridge,
    fit_ridge_many,
    fvu_with_prediction,
)
from darkmatter.stats.split import is_train, token_hash

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
    "StreamingMetric",
    "evaluate",
    "fit_ridge",
    "fit_ridge_many",
    "fvu_with_prediction",
    "is_train",
    "token_hash",
]
