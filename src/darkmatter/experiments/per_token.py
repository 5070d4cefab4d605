"""Figs 4, 5, 12 and 16: per-token error norms across SAEs of one site.

- R² of predicting SAE j's per-token squared error norm from SAE i's (Eq. 13, no intercept), with the
  intercept and unsquared variants;
- the percent reduction of unexplained variance when SAE i's nonlinear-error norm is added (App. E),
  with squared norms (``nonlinear_gain``, as Eq. 13) and with plain norms (``nonlinear_gain_plain``, as
  the paper's code); the two can differ in sign;
- a token trace of error norms, and samples of linear vs nonlinear norms, from the per-token table.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from darkmatter.experiments.decomposition import NormGram, ols_from_gram
from darkmatter.stats.jackknife import finite_interval

Matrix = list[list[float | None]]


def scaling_between_saes(gram: NormGram, names: list[str]) -> dict[str, Matrix]:
    """Pairwise per-token regressions among ``names`` (ordered by width): row i predicts column j > i."""
    col = {c: i for i, c in enumerate(gram.columns)}
    n = len(names)
    keys = ("r2", "r2_intercept", "r2_plain", "nonlinear_gain", "nonlinear_gain_plain")
    out: dict[str, Matrix] = {k: [[None] * n for _ in range(n)] for k in keys}
    train, test = gram.train, gram.test
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if j <= i:
                continue
            y = col[f"{b}:e2"]
            out["r2"][i][j] = ols_from_gram(train, test, [col[f"{a}:e2"]], y, intercept=False)[1]
            out["r2_intercept"][i][j] = ols_from_gram(train, test, [col[f"{a}:e2"]], y, intercept=True)[1]
            out["r2_plain"][i][j] = ols_from_gram(
                train, test, [col[f"{a}:en"]], col[f"{b}:en"], intercept=True
            )[1]
            out["nonlinear_gain"][i][j] = _gain(gram, col, (f"{a}:e2", f"{a}:nl2"), f"{b}:e2")
            out["nonlinear_gain_plain"][i][j] = _gain(gram, col, (f"{a}:en", f"{a}:nln"), f"{b}:en")
    return out


def scaling_intervals(gram: NormGram, names: list[str]) -> dict[str, list[list[list[float] | None]]]:
    """95% delete-one-block jackknife intervals ``[low, high]`` of every cell of ``scaling_between_saes``
    (empty when the Gram was not kept in blocks)."""
    if len(gram.blocks) < 3:
        return {}
    point = scaling_between_saes(gram, names)
    replicates = [scaling_between_saes(gram.without(b), names) for b in range(len(gram.blocks))]
    out: dict[str, list[list[list[float] | None]]] = {}
    for key, matrix in point.items():
        out[key] = [
            [
                None if value is None else _cell_interval(value, [r[key][i][j] for r in replicates])
                for j, value in enumerate(row)
            ]
            for i, row in enumerate(matrix)
        ]
    return out


def _cell_interval(value: float, replicates: list[float | None]) -> list[float] | None:
    return finite_interval(value, [r for r in replicates if r is not None])


def _gain(gram: NormGram, col: dict[str, int], regressors: tuple[str, str], target: str) -> float | None:
    """Percent less held-out SS_res predicting ``target`` when the second regressor joins the first."""
    y = col[target]
    _, _, ss_one = ols_from_gram(gram.train, gram.test, [col[regressors[0]]], y, intercept=True)
    _, _, ss_two = ols_from_gram(gram.train, gram.test, [col[r] for r in regressors], y, intercept=True)
    return 100.0 * (ss_one - ss_two) / ss_one if ss_one > 0 else None


def token_trace(
    table: Path, names: list[str], decode: Callable[[int], str], *, length: int = 100
) -> dict[str, Any]:
    """Error norms of ``names`` over ``length`` consecutive tokens of one context, with each token's split.

    The context is the one with the most test tokens among its first ``length`` positions (the lowest id
    on a tie), so the trace shows held-out tokens as far as the per-token split allows.
    """
    import pyarrow.parquet as pq

    cols = ["context", "position", "token", "split", *[f"{n}:error_norm" for n in names]]
    t = pq.read_table(table, columns=cols)
    context = np.asarray(t.column("context"))
    position = np.asarray(t.column("position"))
    is_test = np.asarray(t.column("split")) == "test"
    first = _most_held_out_context(context, position, is_test, length)
    sel = np.flatnonzero(context == first)
    order = sel[np.argsort(position[sel])][:length]
    tokens = np.asarray(t.column("token"))[order]
    return {
        "context": first,
        "positions": position[order].tolist(),
        "tokens": [decode(int(tok)) for tok in tokens],
        "split": ["test" if s else "train" for s in is_test[order]],
        "error_norm": {
            n: np.asarray(t.column(f"{n}:error_norm"))[order].astype(float).tolist() for n in names
        },
    }


def _most_held_out_context(
    context: np.ndarray, position: np.ndarray, is_test: np.ndarray, length: int
) -> int:
    """The context with the most test tokens among its first ``length`` positions (lowest id on a tie)."""
    ids = np.unique(context)
    start = {int(c): int(position[context == c].min()) for c in ids}
    counts = [int(is_test[(context == c) & (position < start[int(c)] + length)].sum()) for c in ids]
    return int(ids[int(np.argmax(counts))])


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
