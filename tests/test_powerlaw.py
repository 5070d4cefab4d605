"""Power-law fit FVU(W) = c + a·W^(−m) and the bootstrap over contexts (experiments/powerlaw.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from darkmatter.errors import ConfigError, DataError
from darkmatter.experiments.powerlaw import (
    PowerLawFit,
    bootstrap_fvu,
    bootstrap_power_law,
    bootstrap_ratio,
    fit_power_law,
    resample_contexts,
)
from darkmatter.stats import FVU

WIDTHS = 2.0 ** np.arange(14, 21)  # 16k .. 1M, as in Fig 1
FIG1 = (0.186, 2.708, 0.317)  # the Fig 1 legend: FVU ≈ 0.186 + 2.708·W^(−0.317)


def law(w: np.ndarray, c: float, a: float, m: float) -> np.ndarray:
    return c + a * w ** (-m)


def context_sums(
    rng: np.random.Generator,
    n_ctx: int,
    *,
    law_params: tuple[float, float, float] = FIG1,
    tokens: int = 64,
    d: int = 8,
    sae_noise: float = 0.05,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-context sums with pooled FVU ≈ law(WIDTHS): (sse [S, C], sx [C, d], ssq [C], n [C]).

    x ~ N(3, I_d) per token, summarised exactly: the context sum is normal and the within-context sum of
    squares is chi-squared independently of it. Context difficulty (gamma, mean 1) is shared by all SAEs;
    each SAE also has its own per-context noise, which scatters the FVUs around the law.
    """
    f = law(WIDTHS, *law_params)
    sx = rng.normal(size=(n_ctx, d)) * np.sqrt(tokens) + 3.0 * tokens
    ssq = (sx**2).sum(1) / tokens + rng.chisquare(d * (tokens - 1), n_ctx)
    difficulty = rng.gamma(4.0, 0.25, n_ctx)
    sse = f[:, None] * tokens * d * difficulty * (1 + sae_noise * rng.normal(size=(f.size, n_ctx)))
    return sse, sx, ssq, np.full(n_ctx, float(tokens))


def raw_tokens(seed: int, n_sae: int = 3) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """x: [tokens, d] with per-context offsets, errors: [n_sae, tokens, d], and context lengths."""
    rng = np.random.default_rng(seed)
    lengths = [int(k) for k in rng.integers(1, 30, size=12)]
    offsets = np.repeat(rng.normal(size=(len(lengths), 5)) * 2 + 10, lengths, axis=0)
    x = rng.normal(size=(sum(lengths), 5)) * rng.uniform(0.5, 2, 5) + offsets
    errors = rng.normal(size=(n_sae, *x.shape)) * np.array([0.2, 0.5, 1.0])[:n_sae, None, None]
    return x, errors, lengths


def per_context(x: np.ndarray, errors: np.ndarray, lengths: list[int]) -> tuple[np.ndarray, ...]:
    cuts = np.cumsum(lengths)[:-1]
    xs, es = np.split(x, cuts), np.split(errors, cuts, axis=1)
    sse = np.stack([(e**2).sum(axis=(1, 2)) for e in es], axis=1)  # [n_sae, n_ctx]
    sx = np.stack([c.sum(0) for c in xs])
    ssq = np.array([(c**2).sum() for c in xs])
    return sse, sx, ssq, np.array(lengths, dtype=float)


def direct_fvu(x: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Σ‖e‖² / Σ‖x − x̄‖² per SAE, x̄ the per-dimension mean: [n_sae]."""
    return (errors**2).sum(axis=(1, 2)) / ((x - x.mean(0)) ** 2).sum()


# ----------------------------------------------------------------------------------------------- fit


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
def test_recovers_fig1_law_from_any_seed(seed: int) -> None:
    fit = fit_power_law(WIDTHS, law(WIDTHS, *FIG1), seed=seed)
    np.testing.assert_allclose([fit.c, fit.a, fit.m], FIG1, rtol=1e-4)
    assert fit.converged
    assert fit.rmse < 1e-9


@pytest.mark.parametrize(
    ("params", "widths"),
    [
        ((0.0, 1.5, 0.5), WIDTHS),  # c on its bound
        ((0.05, 40.0, 1.2), WIDTHS),  # steep
        ((0.3, 0.8, 0.05), WIDTHS),  # nearly linear in log W
        ((0.122, 1.0, 0.4), np.array([1e3, 3e3, 2e4, 1e5, 1e6])),  # uneven spacing
    ],
)
def test_recovers_other_planted_laws(params: tuple[float, float, float], widths: np.ndarray) -> None:
    fit = fit_power_law(widths, law(widths, *params), n_restarts=4)
    np.testing.assert_allclose([fit.c, fit.a, fit.m], params, rtol=1e-4, atol=1e-7)
    assert fit.converged


def test_three_widths_interpolate() -> None:
    w = WIDTHS[[0, 3, 6]]
    fit = fit_power_law(w, law(w, *FIG1))
    np.testing.assert_allclose([fit.c, fit.a, fit.m], FIG1, rtol=1e-4)
    assert fit.rmse < 1e-9


def _brute_force_sse(widths: np.ndarray, y: np.ndarray) -> float:
    """min over a dense m grid of the exact (c ≥ 0, a ≥ 0) least squares: an upper bound on the optimum."""
    best = np.inf
    for m in np.geomspace(1e-3, 5, 4000):
        _, resid = nnls(np.stack([np.ones_like(widths), widths ** (-m)], axis=1), y)
        best = min(best, resid**2)
    return best


def test_noisy_fit_is_seed_independent_and_global() -> None:
    rng = np.random.default_rng(3)
    y = law(WIDTHS, *FIG1) + rng.normal(0, 0.004, WIDTHS.size)
    fits = [fit_power_law(WIDTHS, y, seed=s) for s in range(4)] + [fit_power_law(WIDTHS, y, n_restarts=0)]
    ref = fits[0]
    for f in fits[1:]:
        np.testing.assert_allclose([f.c, f.a, f.m, f.rmse], [ref.c, ref.a, ref.m, ref.rmse], rtol=1e-6)
    sse = ref.rmse**2 * WIDTHS.size
    assert sse <= _brute_force_sse(WIDTHS, y) * (1 + 1e-9)
    np.testing.assert_allclose(np.sqrt(np.mean((ref.predict(WIDTHS) - y) ** 2)), ref.rmse, rtol=1e-9)


def test_weights_downweight_an_outlier() -> None:
    y = law(WIDTHS, *FIG1)
    y[2] += 0.05
    weights = np.ones_like(y)
    weights[2] = 0.0
    fit = fit_power_law(WIDTHS, y, weights=weights)
    np.testing.assert_allclose([fit.c, fit.a, fit.m], FIG1, rtol=1e-4)
    assert abs(fit_power_law(WIDTHS, y).m - FIG1[2]) > 1e-3


def test_flat_and_increasing_data_give_constant_fits() -> None:
    flat = fit_power_law(WIDTHS, np.full(WIDTHS.size, 0.3))
    assert not flat.converged
    np.testing.assert_allclose(flat.predict(WIDTHS), 0.3, atol=1e-8)

    rising = np.linspace(0.1, 0.3, WIDTHS.size)
    fit = fit_power_law(WIDTHS, rising)
    assert not fit.converged
    # The best non-increasing fit to increasing data is their mean.
    np.testing.assert_allclose(fit.predict(WIDTHS), rising.mean(), atol=1e-6)
    assert fit.c >= 0 and fit.a > 0 and fit.m > 0


def test_predict_and_to_dict() -> None:
    fit = fit_power_law(WIDTHS, law(WIDTHS, *FIG1))
    assert isinstance(fit.predict(2.0**17), float)
    assert fit.predict(WIDTHS).shape == WIDTHS.shape
    assert fit.predict(1e30) == pytest.approx(fit.c, abs=1e-6)
    d = json.loads(json.dumps(fit.to_dict()))
    assert PowerLawFit(**d) == fit


@pytest.mark.parametrize(
    ("widths", "fvu"),
    [
        ([2**14, 2**15], [0.3, 0.28]),
        ([2**14, 2**15, 2**15, 2**14], [0.3, 0.28, 0.27, 0.31]),  # 4 points, 2 distinct widths
        ([2**14, 2**15, 2**16], [0.3, float("nan"), 0.26]),
        ([2**14, float("inf"), 2**16], [0.3, 0.28, 0.26]),
        ([0, 2**15, 2**16], [0.3, 0.28, 0.26]),
        ([2**14, 2**15, 2**16], [0.3, 0.28]),
        ([[2**14, 2**15, 2**16]], [[0.3, 0.28, 0.26]]),
    ],
)
def test_bad_fit_input_is_a_data_error(widths: list[float], fvu: list[float]) -> None:
    with pytest.raises(DataError):
        fit_power_law(widths, fvu)


def test_bad_fit_config() -> None:
    with pytest.raises(ConfigError):
        fit_power_law(WIDTHS, law(WIDTHS, *FIG1), n_restarts=-1)
    with pytest.raises(DataError, match="weights"):
        fit_power_law(WIDTHS, law(WIDTHS, *FIG1), weights=[1.0] * 6 + [-1.0])


# ------------------------------------------------------------------------------------------ bootstrap


def test_resample_contexts() -> None:
    w = resample_contexts(30, 500, seed=4)
    assert w.shape == (500, 30)
    assert (w.sum(1) == 30).all()
    assert np.array_equal(w, resample_contexts(30, 500, seed=4))
    assert not np.array_equal(w, resample_contexts(30, 500, seed=5))
    assert abs(w.mean() - 1) < 0.02


def test_bootstrap_fvu_matches_per_token_fvu() -> None:
    x, errors, lengths = raw_tokens(0)
    sums = per_context(x, errors, lengths)
    ones = np.ones((1, len(lengths)))
    got = bootstrap_fvu(*sums, multiplicities=ones)[0]
    np.testing.assert_allclose(got, direct_fvu(x, errors), rtol=1e-12)

    metric = FVU(x.shape[1])
    metric.update(torch.from_numpy(x), torch.from_numpy(x - errors[1]))
    assert got[1] == pytest.approx(metric.compute(), rel=1e-10)

    # Sums about a shifted origin give the same FVU (the denominator is shift-invariant).
    shifted = per_context(x - 7.0, errors, lengths)
    np.testing.assert_allclose(bootstrap_fvu(*shifted, multiplicities=ones)[0], got, rtol=1e-10)


def test_bootstrap_fvu_multiplicities_equal_duplicated_tokens() -> None:
    x, errors, lengths = raw_tokens(1)
    sums = per_context(x, errors, lengths)
    w = resample_contexts(len(lengths), 4, seed=9)
    got = bootstrap_fvu(*sums, multiplicities=w)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    for b in range(w.shape[0]):
        rows = np.concatenate(
            [np.arange(starts[c], starts[c + 1]) for c in range(len(lengths)) for _ in range(w[b, c])]
        )
        np.testing.assert_allclose(got[b], direct_fvu(x[rows], errors[:, rows]), rtol=1e-10)
    # Without multiplicities, the seed picks the same resamples.
    np.testing.assert_array_equal(bootstrap_fvu(*sums, n_boot=4, seed=9), got)


def test_bootstrap_c_interval_covers_truth() -> None:
    covered = 0
    for e in range(20):
        rng = np.random.default_rng(100 + e)
        res = bootstrap_power_law(WIDTHS, *context_sums(rng, 200), n_boot=30, seed=e, n_restarts=0)
        covered += res.c.low <= FIG1[0] <= res.c.high
        assert res.c.low <= res.c.point <= res.c.high
    assert covered >= 16  # nominal 95% of 20 = 19


def test_bootstrap_interval_shrinks_with_more_contexts() -> None:
    def c_std(n_ctx: int) -> float:
        sums = context_sums(np.random.default_rng(n_ctx), n_ctx)
        return bootstrap_power_law(WIDTHS, *sums, n_boot=60, seed=0, n_restarts=0).c.std

    assert c_std(1600) < 0.5 * c_std(100)  # ≈ 1/4 expected from 1/sqrt(n)


def test_bootstrap_power_law_result() -> None:
    sums = context_sums(np.random.default_rng(0), 150)
    res = bootstrap_power_law(WIDTHS, *sums, n_boot=20, seed=3, n_restarts=1)
    point = bootstrap_fvu(*sums, multiplicities=np.ones((1, 150)))[0]
    np.testing.assert_allclose([e.point for e in res.fvu], point)
    assert res.fit == fit_power_law(WIDTHS, point, seed=3)
    assert (res.c.point, res.a.point, res.m.point) == (res.fit.c, res.fit.a, res.fit.m)
    assert len(res.samples) == 20 and res.n_converged == 20
    boot = bootstrap_fvu(*sums, n_boot=20, seed=3)
    np.testing.assert_allclose([e.mean for e in res.fvu], boot.mean(0))
    assert np.mean([s[0] for s in res.samples]) == pytest.approx(res.c.mean)
    again = bootstrap_power_law(WIDTHS, *sums, n_boot=20, seed=3, n_restarts=1)
    assert again.to_dict() == res.to_dict()
    json.dumps(res.to_dict())


def test_bootstrap_ratio_horizontal_line() -> None:
    sums = context_sums(np.random.default_rng(5), 120)
    res = bootstrap_ratio(*sums, n_boot=100, seed=2, ci=0.9)
    point = bootstrap_fvu(*sums, multiplicities=np.ones((1, 120)))[0]
    boot = bootstrap_fvu(*sums, n_boot=100, seed=2)
    np.testing.assert_allclose([e.point for e in res.series], point)
    assert res.average.point == pytest.approx(point.mean())
    lo, hi = np.quantile(boot.mean(1), [0.05, 0.95])
    assert (res.average.low, res.average.high) == pytest.approx((lo, hi))
    assert res.average.std < np.mean([e.std for e in res.series]) * 1.01
    assert json.loads(json.dumps(res.to_dict()))["average"]["point"] == pytest.approx(point.mean())


def test_bootstrap_bad_input() -> None:
    sse, sx, ssq, n = context_sums(np.random.default_rng(0), 10)
    with pytest.raises(DataError, match="contexts"):
        bootstrap_fvu(sse, sx[:9], ssq, n)
    with pytest.raises(DataError, match="non-finite"):
        bootstrap_fvu(np.where(sse > sse.mean(), np.nan, sse), sx, ssq, n)
    with pytest.raises(DataError, match="variance"):
        bootstrap_fvu(sse, np.zeros_like(sx), np.zeros_like(ssq), n)
    with pytest.raises(DataError, match="n_sae"):
        bootstrap_power_law(WIDTHS[:5], sse, sx, ssq, n)
    with pytest.raises(ConfigError):
        bootstrap_power_law(WIDTHS, sse, sx, ssq, n, n_boot=1)
    with pytest.raises(ConfigError):
        bootstrap_ratio(sse, sx, ssq, n, ci=1.5)
