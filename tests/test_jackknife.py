"""The jackknife interval covers a known mean at about its nominal rate."""

from __future__ import annotations

import math

import numpy as np

from darkmatter.stats.jackknife import jackknife_interval


def test_jackknife_of_a_mean_is_the_t_interval() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    loo = [(x.sum() - v) / (len(x) - 1) for v in x]
    low, high = jackknife_interval(float(x.mean()), loo)
    from scipy import stats

    se = x.std(ddof=1) / math.sqrt(len(x))
    t = stats.t.ppf(0.975, len(x) - 1)
    assert math.isclose(low, x.mean() - t * se, rel_tol=1e-9) and math.isclose(
        high, x.mean() + t * se, rel_tol=1e-9
    )


def test_coverage_of_block_means_is_near_nominal() -> None:
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(400):
        blocks = rng.normal(loc=3.0, size=(8, 50)).mean(1)
        loo = [(blocks.sum() - b) / 7 for b in blocks]
        low, high = jackknife_interval(float(blocks.mean()), loo)
        hits += low <= 3.0 <= high
    assert 0.91 <= hits / 400 <= 0.99


def test_too_few_blocks_give_no_interval() -> None:
    assert all(math.isnan(v) for v in jackknife_interval(1.0, [1.0, 2.0]))
