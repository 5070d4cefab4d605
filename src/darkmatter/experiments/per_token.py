"""Figs 4, 5, 12 and 16: per-token error norms across SAEs of one site.

- R² of predicting SAE j's per-token squared error norm from SAE i's (Eq. 13, no intercept), with the
  intercept and unsquared variants;
- the percent reduction of unexplained variance when SAE i's nonlinear-error norm is added (App. E);
- a token trace of error norms, and samples of linear vs nonlinear norms, from the per-token table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from darkmatter.experiments.decomposition import NormGram, ols_from_gram

Matrix = list[list[float | None]]


def scaling_between_saes(gram: NormGram, names: list[str]) -> dict[str, Matrix]:
    """Pairwise per-token regressions among ``names`` (ordered by width): row i predicts column j > i."""
    col = {c: i for i, c in enumerate(gram.columns)}
    n = len(names)
    out: dict[str, Matrix] = {
        k: [[None] * n for _ in range(n)] for k in ("r2", "r2_intercept", "r2_plain", "nonlinear_gain")
    }
    train, test = gram.train, gram.test
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if j <= i:
                continue
            y = col[f"{b}:e2"]
            out["r2"][i][j] = ols_from_gram(train, test, [col[f"{a}:e2"]], y, intercept=False)[1]
            _, r2_intercept, ss_one = ols_from_gram(train, test, [col[f"{a}:e2"]], y, intercept=True)
            out["r2_intercept"][i][j] = r2_intercept
            out["r2_plain"][i][j] = ols_from_gram(
                train, test, [col[f"{a}:en"]], col[f"{b}:en"], intercept=True
            )[1]
            both = [col[f"{a}:e2"], col[f"{a}:nl2"]]
            _, _, ss_two = ols_from_gram(train, test, both, y, intercept=True)
            out["nonlinear_gain"][i][j] = 100.0 * (ss_one - ss_two) / ss_one if ss_one > 0 else None
    return out


def token_trace(
    table: Path, names: list[str], decode: Callable[[int], str], *, length: int = 100
) -> dict[str, Any]:
    """Error norms of ``names`` over ``length`` consecutive tokens of the first context in the table."""
    import pyarrow.parquet as pq

    cols = ["context", "position", "token", *[f"{n}:error_norm" for n in names]]
    t = pq.read_table(table, columns=cols)
    context = np.asarray(t.column("context"))
    first = int(context.min())
    sel = np.flatnonzero(context == first)
    pos = np.asarray(t.column("position"))[sel]
    order = sel[np.argsort(pos)][:length]
    tokens = np.asarray(t.column("token"))[order]
    return {
        "context": first,
        "positions": np.asarray(t.column("position"))[order].tolist(),
        "tokens": [decode(int(tok)) for tok in tokens],
        "error_norm": {
            n: np.asarray(t.column(f"{n}:error_norm"))[order].astype(float).tolist() for n in names
        },
    }


def norm_samples(
    table: Path, names: list[str], *, max_rows: int = 4000, seed: int = 0
) -> dict[str, list[list[float]]]:
    """Per-token linear and nonlinear error norms (a seeded sample of test tokens) for the Fig 12 violins."""
    import pyarrow.parquet as pq

    cols = ["split", *[f"{n}:{q}" for n in names for q in ("linear_norm", "nonlinear_norm")]]
    t = pq.read_table(table, columns=cols)
    test = np.flatnonzero(np.asarray(t.column("split")) == "test")
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(test, size=min(max_rows, len(test)), replace=False))
    return {
        "linear": [np.asarray(t.column(f"{n}:linear_norm"))[pick].astype(float).tolist() for n in names],
        "nonlinear": [
            np.asarray(t.column(f"{n}:nonlinear_norm"))[pick].astype(float).tolist() for n in names
        ],
    }
