"""The synthetic decomposition test (App. B.2 / C.3, Table 1, Fig 15; App. D control) on planted data.

The store holds sparse sums of the 32 signed directions ±q_j of an orthonormal basis of R^16, with
power-law frequencies, plus b_dec. The hand-built TopK SAE has exactly these decoder rows and
W_enc = W_decᵀ. Its output is again such a sum, and re-encoding reproduces it up to rounding, so the
noiseless, unablated reconstruction of x′ = Sae(x) is exact.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from darkmatter.errors import ConfigError, StoreError
from darkmatter.experiments import synthetic as syn
from darkmatter.experiments import synthetic_data as data
from darkmatter.experiments.synthetic import SyntheticResult, synthetic_simulation
from darkmatter.results import read_result, write_result
from darkmatter.sae.model import SAE, SAEConfig
from darkmatter.stats import FVU, Moments, Split, evaluate, fit_ridge, fvu_with_prediction
from darkmatter.store import ActivationStore
from synthetic import synthetic_store

SITE = "blocks.0.hook_resid_post"
D, D_SAE, K = 16, 32, 4
LEVELS = (0.0, 1.0, 2.0, 3.0, 4.0)
SPLIT = Split(seed=0, fraction=0.8)


def planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_dec [32, 16] = [Q; −Q] with Q orthonormal, b_dec [16])."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return torch.cat([q.T, -q.T]).float(), torch.randn(D, generator=g)


def make_sae(seed: int = 0, site: str = SITE) -> SAE:
    w_dec, b_dec = planted(seed)
    cfg = SAEConfig(d_in=D, d_sae=D_SAE, activation="topk", k=K, hook_site=site)
    tensors = {"W_enc": w_dec.T.contiguous(), "b_enc": torch.zeros(D_SAE), "W_dec": w_dec, "b_dec": b_dec}
    return SAE.from_tensors(cfg, tensors)


def make_data(seed: int = 0):
    w_dec, b_dec = planted(seed)
    freq = 0.9 / torch.arange(1, D_SAE + 1)  # power law, ~3.7 active latents per token

    def make(gen: torch.Generator, n_ctx: int, ctx_len: int) -> dict[str, torch.Tensor]:
        n = n_ctx * ctx_len
        active = torch.rand(n, D_SAE, generator=gen) < freq
        mags = torch.rand(n, D_SAE, generator=gen) * 2 + 0.5
        x = (active * mags) @ w_dec + b_dec + 0.01 * torch.randn(n, D, generator=gen)
        return {SITE: x.reshape(n_ctx, ctx_len, D)}

    return make


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    return synthetic_store(tmp_path_factory.mktemp("syn") / "store", make_data(), n_contexts=48, ctx_len=64)


@pytest.fixture(scope="module")
def result(store: ActivationStore) -> SyntheticResult:
    return synthetic_simulation(store, make_sae(), split=SPLIT, n_tokens=10_000)


def rows(
    res: SyntheticResult | syn.SimulationOutcome, ablation: float = 0.0
) -> dict[tuple[float, float], dict]:
    return {(r["sigma_act"], r["sigma_rec"]): r for r in res.grid if r["ablation"] == ablation}


def dense(r: dict) -> float:
    return r["fvu_rec"] - r["fvu_lin"]


# --------------------------------------------------------------------------- the paper's checks


def test_noiseless_unablated_reconstruction_is_exact(result: SyntheticResult) -> None:
    r = rows(result)[(0.0, 0.0)]
    assert result.fvu_floor == r["fvu_rec"]
    assert r["fvu_rec"] < 1e-9
    assert r["fvu_lin"] < 1e-9


def test_dense_estimate_tracks_activation_noise_only(result: SyntheticResult) -> None:
    g = rows(result)
    for sr in LEVELS:
        est = [dense(g[(sa, sr)]) for sa in LEVELS]
        assert all(b > a for a, b in itertools.pairwise(est)), (sr, est)
    growth = dense(g[(4.0, 0.0)]) - dense(g[(0.0, 0.0)])
    assert growth > 0.2
    for sa in LEVELS:  # the reconstruction noise barely moves it
        spread = [dense(g[(sa, sr)]) for sr in LEVELS]
        assert max(spread) - min(spread) < 0.25 * growth, (sa, spread)


def test_introduced_estimate_tracks_reconstruction_noise(result: SyntheticResult) -> None:
    g = rows(result)
    for sa in LEVELS:
        est = [g[(sa, sr)]["fvu_lin"] for sr in LEVELS]
        assert all(b > a for a, b in itertools.pairwise(est)), (sa, est)
    assert g[(0.0, 4.0)]["fvu_lin"] > 0.5


def test_table1_diagonal_dominates(result: SyntheticResult) -> None:
    assert result.diagonal_ok
    entries = [v for row in result.table1 for v in row]
    assert all(v is not None for v in entries)
    dense_act, intro_act, dense_rec, intro_rec = (float(v or 0.0) for v in entries)
    assert dense_act > 0.9 and intro_rec > 0.8
    assert abs(intro_act) < 0.5 and abs(dense_rec) < 0.5
    assert len(result.table1_rows) == 2 and len(result.table1_cols) == 2
    assert result.table1_paper == [[0.9842, 0.1417], [0.0988, 0.9036]]
    for row, bounds in zip(result.table1, result.table1_intervals, strict=True):
        for r, interval in zip(row, bounds, strict=True):
            assert interval is not None and interval[0] < float(r or 0.0) < interval[1]


def test_correlation_interval_is_fisher_z() -> None:
    from darkmatter.experiments.synthetic_summary import correlation_interval

    low, high = correlation_interval(0.5, 25) or [0.0, 0.0]
    half = 1.959963984540054 / math.sqrt(22)
    assert low == pytest.approx(math.tanh(math.atanh(0.5) - half), rel=1e-12)
    assert high == pytest.approx(math.tanh(math.atanh(0.5) + half), rel=1e-12)
    assert (low, high) == pytest.approx((0.13, 0.75), abs=5e-3)  # the textbook r = 0.5, n = 25 interval
    assert correlation_interval(1.0, 25) is None and correlation_interval(None, 25) is None
    assert correlation_interval(0.3, 3) is None


def test_fvu_rec_rises_with_ablation(result: SyntheticResult) -> None:
    settings = {(r["sigma_act"], r["sigma_rec"]) for r in result.grid}
    assert len(settings) == 27  # the 5×5 grid plus (1, 0.6) and (0.6, 1)
    for s in settings:
        curve = [rows(result, p)[s]["fvu_rec"] for p in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)]
        assert all(b >= a - 1e-12 for a, b in itertools.pairwise(curve)), (s, curve)
        assert curve[-1] > curve[0] + 0.01, (s, curve)
    assert [rows(result, p)[(0.0, 0.0)]["n_ablated"] for p in (0.1, 0.3, 0.5)] == [3, 9, 16]


def test_fig15_curves_and_random_control(result: SyntheticResult) -> None:
    keys = [(c.sigma_act, c.sigma_rec) for c in result.curves]
    assert keys == [(0.0, 0.0), (1.0, 0.6), (0.6, 1.0), (2.0, 2.0)]
    for c in result.curves:
        assert len(c.fvu_rec) == len(c.fvu_lin) == 6
        assert c.lin_verdict is not None and c.lin_verdict.split(" ")[0] in ("flat", "rising", "falling")
        assert c.shape_lin is not None and 0.0 <= c.shape_lin.curvature_ratio <= 1.0
    ctrl = result.random_control
    assert ctrl is not None
    assert ctrl.n_directions == 25 * D
    assert ctrl.fvu_floor is not None and ctrl.fvu_floor < 1e-9  # the control decodes its own codes
    assert (
        math.isclose(ctrl.expected_l0, result.l0) and abs(ctrl.l0 - ctrl.expected_l0) < 0.2 * ctrl.expected_l0
    )
    rec = ctrl.curves[0].fvu_rec
    assert rec[-1] > rec[0]
    assert any("random control" in n for n in result.notes)
    assert any("fewer than the 10000 requested" in n for n in result.notes)


def test_curve_shape_separates_lines_from_parabolas() -> None:
    p = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    line = syn.curve_shape(p, [0.1 + 0.3 * v for v in p])
    parabola = syn.curve_shape(p, [0.1 + 2.0 * v * v for v in p])
    assert line["curvature_ratio"] < 1e-6 and line["shape"] == "linear"
    assert math.isclose(line["linear_r2"], 1.0)
    assert parabola["curvature_ratio"] > 0.99 and parabola["shape"] == "curved"
    assert syn.curve_shape(p, [0.2] * 6)["curvature_ratio"] == 0.0


# --------------------------------------------------------------------------- exactness, determinism, options


def test_moment_algebra_matches_explicit_computation(store: ActivationStore) -> None:
    """FVU_rec and FVU_lin of a few settings, recomputed from explicit tensors with the house primitives."""
    sae = make_sae()
    abl = [0.0, 0.25]
    res = synthetic_simulation(
        store,
        sae,
        split=SPLIT,
        n_tokens=2000,
        ablations=abl,
        levels=(0.0, 1.5),
        extra=((0.7, 2.5),),
        seed=3,
        random_control=False,
    )
    batches = list(store.iter_batches([SITE], batch_tokens=10**6))
    x = torch.cat([b.acts[SITE] for b in batches])[:2000]
    ctx = torch.cat([b.context for b in batches])[:2000]
    pos = torch.cat([b.position for b in batches])[:2000]
    train = SPLIT.mask(ctx, pos)
    n_train = int(train.sum())
    mass = sae.encode(x).double().mean(0)  # unit-norm decoder rows
    keeps, _ = data.keeps(mass, abl)
    x = x[torch.argsort((~train).to(torch.int8), stable=True)]
    xp = sae(x)
    codes = sae.encode_sparse(xp)
    e1, e2 = (
        torch.cat(t) for t in zip(*data.noise_chunks(3, data.chunk_spans(n_train, 2000), D), strict=True)
    )
    s = res.scale
    assert math.isclose(s, math.sqrt(float(xp.double().var(0, correction=0).mean())) / 4, rel_tol=1e-9)
    got = {(r["sigma_act"], r["sigma_rec"], r["ablation"]): r for r in res.grid}
    for sa, sr, i in [(0.7, 2.5, 1), (1.5, 0.0, 0), (0.0, 1.5, 1), (1.5, 1.5, 1)]:
        xt = xp + sa * s * e1
        r = sae.decode_sparse(data.masked(codes, keeps[i])) + sr * s * e2
        e = xt - r
        tr, te = Moments(D, {"e": D}), Moments(D, {"e": D})
        tr.update(xt[:n_train], {"e": e[:n_train]})
        te.update(xt[n_train:], {"e": e[n_train:]})
        fvu = FVU(D)
        fvu.update(xt[n_train:], r[n_train:])
        fvu_lin = fvu_with_prediction(evaluate(fit_ridge(tr, "e"), te, "e"), te.total_variance_x())
        row = got[(sa, sr, abl[i])]
        assert math.isclose(row["fvu_rec"], fvu.compute(), rel_tol=1e-7), (sa, sr, i)
        assert math.isclose(row["fvu_lin"], fvu_lin, rel_tol=1e-7), (sa, sr, i)


def test_deterministic_given_seeds(store: ActivationStore) -> None:
    kw: dict[str, Any] = {"n_tokens": 1500, "ablations": (0.0, 0.5), "levels": (0.0, 2.0), "extra": ()}
    a = synthetic_simulation(store, make_sae(), split=SPLIT, **kw)
    b = synthetic_simulation(store, make_sae(), split=SPLIT, **kw)
    assert a.grid == b.grid and a.table1 == b.table1 and a.config_hash == b.config_hash
    assert a.random_control is not None and b.random_control is not None
    assert a.random_control.grid == b.random_control.grid
    kw["random_control"] = False
    other = synthetic_simulation(store, make_sae(), split=SPLIT, seed=1, **kw)
    assert other.grid != a.grid and other.seed == 1
    resplit = synthetic_simulation(store, make_sae(), split=Split(seed=5, fraction=0.8), **kw)
    assert resplit.n_train != a.n_train and resplit.grid != a.grid
    assert resplit.config["split_seed"] == 5 and resplit.config["train_fraction"] == 0.8
    assert len({a.config_hash, other.config_hash, resplit.config_hash}) == 3


def test_options_scale_reencode_and_round_trip(store: ActivationStore, tmp_path: Path) -> None:
    kw: dict[str, Any] = {
        "n_tokens": 1500,
        "ablations": (0.0, 0.5),
        "levels": (0.0, 1.0),
        "extra": (),
        "random_control": False,
        "split": SPLIT,
    }
    ideal = synthetic_simulation(store, make_sae(), reencode=False, scale=0.3, **kw)
    assert ideal.fvu_floor == 0.0 and rows(ideal)[(0.0, 0.0)]["fvu_lin"] == 0.0
    assert ideal.scale == 0.3 and ideal.random_control is None and not ideal.reencode
    write_result(tmp_path, ideal)
    back = read_result(tmp_path, "synthetic_simulation", SyntheticResult)
    assert back is not None and back.grid == ideal.grid and back.config == ideal.config
    no_zero = synthetic_simulation(store, make_sae(), **(kw | {"levels": (1.0, 2.0)}))
    assert no_zero.fvu_floor is None  # no noiseless setting
    write_result(tmp_path, no_zero)
    assert read_result(tmp_path, "synthetic_simulation", SyntheticResult) == no_zero


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ablations": (0.1, 0.5)}, "include 0"),
        ({"ablations": (0.0, 1.0)}, "include 0"),
        ({"levels": (2.0,)}, "two distinct"),
        ({"extra": ((-1.0, 0.0),)}, ">= 0"),
        ({"scale": 0.0}, "scale"),
    ],
)
def test_bad_settings_raise(store: ActivationStore, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        synthetic_simulation(store, make_sae(), split=SPLIT, **kw)


def test_sae_for_another_site_raises(store: ActivationStore) -> None:
    with pytest.raises(StoreError, match="lacks"):
        synthetic_simulation(store, make_sae(site="blocks.3.hook_resid_post"), split=SPLIT)
