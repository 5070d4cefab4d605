"""Least squares among a few per-token scalars, from their raw Grams (the per-token scaling fits)."""

from __future__ import annotations

import numpy as np

from darkmatter.errors import DataError


def ols_from_gram(
    g_train: np.ndarray, g_test: np.ndarray, x_cols: list[int], y_col: int, *, intercept: bool
) -> tuple[np.ndarray, float, float]:
    """Least squares of column ``y_col`` on ``x_cols`` (+ the last column as intercept) from raw Grams.

    Returns (coefficients, held-out R², held-out SS_res). ``g_*`` are Grams of [z..., 1].
    """
    one = g_train.shape[0] - 1
    cols = list(x_cols) + ([one] if intercept else [])
    a = g_train[np.ix_(cols, cols)]
    b = g_train[cols, y_col]
    coef = np.linalg.solve(a + 1e-12 * np.trace(a) / len(cols) * np.eye(len(cols)), b)
    gt = g_test
    ss_res = gt[y_col, y_col] - 2 * coef @ gt[cols, y_col] + coef @ gt[np.ix_(cols, cols)] @ coef
    n = gt[one, one]
    ss_tot = gt[y_col, y_col] - gt[one, y_col] ** 2 / n
    if ss_tot <= 0:
        raise DataError("A per-token norm is constant on the test split; its R² is undefined.")
    return coef, float(1 - ss_res / ss_tot), float(ss_res)
