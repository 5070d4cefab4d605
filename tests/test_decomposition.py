"""The decomposition engine against planted structure and explicit batch computations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from darkmatter.errors import DataError, ShapeError, StoreError
from darkmatter.experiments.decomposition import decompose, ols_from_gram
from darkmatter.sae.model import SAE, SAEConfig, SparseCodes
from darkmatter.stats.split import Split, is_train
from synthetic import sparse_features, synthetic_store

SITE = "blocks.0.hook_resid_post"
SPLIT = Split(0, 0.8)
D = 12


class PlantedSAE(SAE):
    """x_hat = x − (x A + c) − g(x): a known linear error component plus a nonlinear one."""

    A: torch.Tensor
    c: torch.Tensor
    R: torch.Tensor
    amp: float

    def reconstruct(self, x: torch.Tensor, *, chunk_size: int | None = None) -> tuple[torch.Tensor, Any]:
        lin = x @ self.A + self.c
        x_hat = x - lin - self.nonlinear(x)
        n = x.shape[0]
        codes = SparseCodes(torch.zeros(n, 2, dtype=torch.long), torch.ones(n, 2))
        return x_hat, codes

    def nonlinear(self, x: torch.Tensor) -> torch.Tensor:
        return self.amp * torch.sin(40.0 * (x @ self.R))


def planted(seed: int = 0, lin_scale: float = 0.3, amp: float = 0.3) -> PlantedSAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=D, d_sae=4, activation="topk", k=2, hook_site=SITE)
    tensors = {
        "W_enc": torch.randn(D, 4, generator=g),
        "b_enc": torch.zeros(4),
        "W_dec": torch.randn(4, D, generator=g),
        "b_dec": torch.zeros(D),
    }
    sae = PlantedSAE.from_tensors(cfg, tensors)
    sae.A = lin_scale * torch.randn(D, D, generator=g) / D**0.5
    sae.c = torch.randn(D, generator=g)
    sae.R = torch.randn(D, D, generator=g)
    sae.amp = amp
    return sae


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("dec") / "store"
    return synthetic_store(
        path, sparse_features(d=D, n_features=40, active=3), n_contexts=60, ctx_len=32, with_loss=True
    )


def _all_rows(store) -> tuple[torch.Tensor, torch.Tensor]:
    rows = list(store.iter_batches([SITE], batch_tokens=10**6))
    x = torch.cat([b.acts[SITE] for b in rows]).double()
    train = torch.cat([is_train(b.context, b.position, 0, 0.8) for b in rows])
    return x, train


def _fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_planted_linear_share(store, seed: int) -> None:
    sae = planted(seed)
    dec = decompose(store, {"p": sae}, split=SPLIT)
    st = dec.stats["p"]
    x, train = _all_rows(store)
    xs = x[~train].float()
    x_hat = sae.reconstruct(xs)[0]
    true_share = _fvu(xs.double(), x_hat.double()) - _fvu(xs.double(), (x_hat + xs @ sae.A + sae.c).double())
    assert true_share > 0.05  # the planted component matters
    assert abs((st.fvu - st.fvu_nonlinear) - true_share) < 0.01
    assert abs(st.fvu - _fvu(xs.double(), x_hat.double())) < 1e-6
    assert abs(st.fvu_nonlinear - st.fvu_nonlinear_pass2) < 1e-5  # moments agree with explicit residuals


def test_matches_explicit_batch_regression(store, tmp_path: Path) -> None:
    sae = planted(3, amp=0.5)
    dec = decompose(store, {"p": sae}, split=SPLIT, table_path=tmp_path / "tokens.parquet", batch_tokens=333)
    st = dec.stats["p"]
    x, train = _all_rows(store)
    e = x - sae.reconstruct(x.float())[0].double()
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    b = torch.linalg.lstsq(xt[train], e[train]).solution
    res = e[~train] - xt[~train] @ b
    ss_tot = (e[~train] - e[~train].mean(0)).pow(2).sum(0)
    r2_dims = 1 - res.pow(2).sum(0) / ss_tot
    assert abs(st.vector_r2 - float(r2_dims.mean())) < 1e-6
    fvu_nl = float(res.pow(2).sum() / (x[~train] - x[~train].mean(0)).pow(2).sum())
    assert abs(st.fvu_nonlinear - fvu_nl) < 1e-6
    # norm probe on the squared error norm
    y = e.pow(2).sum(1, keepdim=True)
    by = torch.linalg.lstsq(xt[train], y[train]).solution
    r = y[~train] - xt[~train] @ by
    assert abs(st.norm_r2 - float(1 - r.pow(2).sum() / (y[~train] - y[~train].mean()).pow(2).sum())) < 1e-6
    # per-token table: every token once, norms consistent
    table = pq.read_table(tmp_path / "tokens.parquet")
    assert table.num_rows == len(x)
    err = np.asarray(table.column("p:error_norm"))
    lin = np.asarray(table.column("p:linear_norm"))
    assert np.allclose(np.sort(err), np.sort(e.norm(dim=1).numpy()), rtol=1e-4)
    assert (lin > 0).all()
    assert set(np.asarray(table.column("split")).tolist()) == {"train", "test"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_table_is_the_same_whatever_the_row_group(store, tmp_path: Path, monkeypatch) -> None:
    from darkmatter.experiments.decomposition.table import TokenTableWriter

    sae = planted(5)
    decompose(store, {"p": sae}, split=SPLIT, table_path=tmp_path / "one.parquet", batch_tokens=333)
    monkeypatch.setattr(TokenTableWriter, "ROW_GROUP", 100)  # boundaries fall inside batches
    decompose(store, {"p": sae}, split=SPLIT, table_path=tmp_path / "many.parquet", batch_tokens=333)
    one, many = pq.read_table(tmp_path / "one.parquet"), pq.read_table(tmp_path / "many.parquet")
    assert pq.ParquetFile(tmp_path / "many.parquet").metadata.num_row_groups == -(-one.num_rows // 100)
    assert one.equals(many)
    rows = list(store.iter_batches([SITE], batch_tokens=10**6))
    assert np.array_equal(np.asarray(one.column("context")), torch.cat([b.context for b in rows]).numpy())
    assert np.array_equal(np.asarray(one.column("token")), torch.cat([b.token for b in rows]).numpy())
    assert np.allclose(np.asarray(one.column("loss")), torch.cat([b.loss for b in rows]).numpy())


def test_per_token_scaling_from_grams(store) -> None:
    small, big = planted(4, amp=0.2), planted(4, amp=0.2)
    big.A = big.A * 0.5
    dec = decompose(store, {"small": small, "big": big}, split=SPLIT)
    g = dec.norm_grams[SITE]
    i, j = g.columns.index("small:e2"), g.columns.index("big:e2")
    coef, r2, _ = ols_from_gram(g.train, g.test, [i], j, intercept=False)
    x, train = _all_rows(store)
    es = (x - small.reconstruct(x.float())[0].double()).pow(2).sum(1)
    eb = (x - big.reconstruct(x.float())[0].double()).pow(2).sum(1)
    c = float((es[train] * eb[train]).sum() / (es[train] ** 2).sum())
    assert abs(coef[0] - c) < 1e-8 * abs(c) + 1e-10
    pred = c * es[~train]
    ref = 1 - float((eb[~train] - pred).pow(2).sum() / (eb[~train] - eb[~train].mean()).pow(2).sum())
    assert abs(r2 - ref) < 1e-6  # per-token errors are float32 in the engine


def test_bad_inputs(store, tmp_path: Path) -> None:
    sae = planted(0)
    sae.cfg.hook_site = "blocks.5.hook_mlp_out"
    with pytest.raises(StoreError, match="lacks"):
        decompose(store, {"p": sae}, split=SPLIT)
    wide = SAE.from_tensors(
        SAEConfig(d_in=D + 1, d_sae=4, activation="topk", k=1, hook_site=SITE),
        {
            "W_enc": torch.randn(D + 1, 4),
            "b_enc": torch.zeros(4),
            "W_dec": torch.randn(4, D + 1),
            "b_dec": torch.zeros(D + 1),
        },
    )
    with pytest.raises(ShapeError):
        decompose(store, {"w": wide}, split=SPLIT)
    small = synthetic_store(tmp_path / "small", sparse_features(d=D), n_contexts=1, ctx_len=8)
    with pytest.raises(DataError, match="Harvest more contexts"):
        decompose(small, {"p": planted(0)}, split=SPLIT)
    with pytest.raises(DataError):
        decompose(store, {}, split=SPLIT)


class PerfectSAE(PlantedSAE):
    """Reconstructs exactly: the error is identically zero (a degenerate target)."""

    def reconstruct(self, x: torch.Tensor, *, chunk_size: int | None = None) -> tuple[torch.Tensor, Any]:
        return x.clone(), SparseCodes(torch.zeros(x.shape[0], 1, dtype=torch.long), torch.ones(x.shape[0], 1))


def test_constant_error_is_a_clear_error(store) -> None:
    perfect = PerfectSAE.from_tensors(planted(0).cfg, dict(planted(0).named_tensors()))
    with pytest.raises(DataError, match="constant"):
        decompose(store, {"perfect": perfect}, split=SPLIT)


def test_nan_activations_are_a_clear_error(tmp_path: Path) -> None:
    base = sparse_features(d=D)

    def with_nan(gen: torch.Generator, n_ctx: int, ctx_len: int) -> dict[str, torch.Tensor]:
        out = base(gen, n_ctx, ctx_len)
        out[SITE][0, 3, 1] = float("nan")
        return out

    bad = synthetic_store(tmp_path / "nan", with_nan, n_contexts=40, ctx_len=32)
    with pytest.raises(DataError, match="NaN"):
        decompose(bad, {"p": planted(0)}, split=SPLIT)


def test_saes_on_several_sites_are_grouped(tmp_path: Path) -> None:
    base = sparse_features(d=D)

    def two_sites(gen: torch.Generator, n_ctx: int, ctx_len: int) -> dict[str, torch.Tensor]:
        x = base(gen, n_ctx, ctx_len)[SITE]
        return {SITE: x, "blocks.1.hook_resid_post": 2 * x + 1}

    st = synthetic_store(tmp_path / "two", two_sites, n_contexts=40, ctx_len=32)
    other = planted(1)
    other.cfg.hook_site = "blocks.1.hook_resid_post"
    dec = decompose(st, {"a": planted(0), "b": other}, split=SPLIT)
    assert set(dec.norm_grams) == {SITE, "blocks.1.hook_resid_post"}
    assert dec.stats["a"].site != dec.stats["b"].site


def test_nonlinear_gain_in_both_variants_matches_explicit_regressions(store) -> None:
    from darkmatter.experiments.per_token import scaling_between_saes

    small, big = planted(4, amp=0.3), planted(5, amp=0.3)
    dec = decompose(store, {"small": small, "big": big}, split=SPLIT)
    out = scaling_between_saes(dec.norm_grams[SITE], ["small", "big"])
    x, train = _all_rows(store)

    def norms(name: str, sae: PlantedSAE) -> tuple[torch.Tensor, torch.Tensor]:
        """‖e‖ and ‖NonlinearError‖ per token, with the engine's probe."""
        weights, bias = dec.probes[name]
        e = x - sae.reconstruct(x.float())[0].double()
        nonlinear = e - torch.addmm(bias.double(), x, weights.double())
        return e.norm(dim=1), nonlinear.norm(dim=1)

    en_s, nln_s = norms("small", small)
    en_b, _ = norms("big", big)

    def gain(power: int) -> float:
        def ss(cols: list[torch.Tensor]) -> float:
            a = torch.stack([*cols, torch.ones_like(en_s)], 1)
            coef = torch.linalg.lstsq(a[train], (en_b**power)[train, None]).solution
            return float(((en_b**power)[~train, None] - a[~train] @ coef).pow(2).sum())

        one, two = ss([en_s**power]), ss([en_s**power, nln_s**power])
        return 100 * (one - two) / one

    assert out["nonlinear_gain"][0][1] == pytest.approx(gain(2), abs=1e-3)
    assert out["nonlinear_gain_plain"][0][1] == pytest.approx(gain(1), abs=1e-3)
    assert out["nonlinear_gain"][1][0] is None and out["nonlinear_gain_plain"][1][0] is None


def test_token_trace_shows_the_context_with_the_most_held_out_tokens(tmp_path: Path) -> None:
    import pyarrow as pa

    from darkmatter.experiments.per_token import token_trace

    n_ctx, n_pos = 4, 10
    context = np.repeat(np.arange(n_ctx), n_pos).astype(np.int32)
    position = np.tile(np.arange(n_pos), n_ctx).astype(np.int32)
    split = np.where(context == 2, "test", "train")  # context 0 has no held-out token, context 2 only those
    split[(context == 1) & (position < 3)] = "test"
    table = pa.table(
        {
            "context": context,
            "position": position,
            "token": (position + 100 * context).astype(np.int32),
            "split": split,
            "a:error_norm": np.arange(n_ctx * n_pos, dtype=np.float32),
        }
    )
    path = tmp_path / "tokens.parquet"
    pq.write_table(table, path)
    trace = token_trace(path, ["a"], str, length=5)
    assert trace["context"] == 2 and trace["split"] == ["test"] * 5
    assert trace["tokens"] == [str(200 + i) for i in range(5)] and trace["positions"] == list(range(5))


def test_jackknife_intervals_refit_the_probe_per_block(store) -> None:
    """Each replicate equals a fresh engine run on the contexts outside its block; intervals hold it."""
    sae = planted(2)
    full = decompose(store, {"p": sae}, split=SPLIT, interval_site=SITE, interval_blocks=4, second_pass=False)
    st = full.stats["p"]
    assert set(st.intervals) == {"fvu", "fvu_nonlinear", "vector_r2", "norm_r2"}
    for key, (low, high) in st.intervals.items():
        assert low < getattr(st, key) < high, key
    n_shards = store.n_shards
    block_of = [(c // store.shard_contexts) * 4 // n_shards for c in range(store.n_contexts)]
    for b in range(4):
        others = np.asarray([c for c in range(store.n_contexts) if block_of[c] != b])
        loo = decompose(store, {"p": sae}, split=SPLIT, contexts=others, second_pass=False).stats["p"]
        for key in ("fvu", "fvu_nonlinear", "vector_r2", "norm_r2"):
            assert st.jackknife[key][b] == pytest.approx(getattr(loo, key), rel=1e-6), (key, b)
    plain = decompose(store, {"p": sae}, split=SPLIT, second_pass=False).stats["p"]
    assert plain.fvu_nonlinear == pytest.approx(st.fvu_nonlinear, rel=1e-9) and plain.intervals == {}


def test_norm_test_intervals_leave_out_each_block(store) -> None:
    """Replicates of the norm test's probe-free quantities equal a fresh run without the block."""
    sae = planted(2)
    st = decompose(store, {"p": sae}, split=SPLIT, interval_site=SITE, interval_blocks=4).stats["p"]
    quantities = ("x", "sae", "error", "linear", "nonlinear")
    assert {f"norm_test.{q}" for q in quantities} <= set(st.intervals)
    block_of = [(c // store.shard_contexts) * 4 // store.n_shards for c in range(store.n_contexts)]
    for b in range(4):
        others = np.asarray([c for c in range(store.n_contexts) if block_of[c] != b])
        loo = decompose(store, {"p": sae}, split=SPLIT, contexts=others).stats["p"]
        for q in ("x", "sae", "error"):  # the linear and nonlinear parts also depend on b*, held fixed
            assert st.jackknife[f"norm_test.{q}"][b] == pytest.approx(loo.norm_test[q], rel=1e-6), (q, b)


def test_per_token_intervals_come_from_grams_without_each_block(store) -> None:
    from darkmatter.experiments.per_token import scaling_between_saes, scaling_intervals

    saes = {"small": planted(4, amp=0.2), "big": planted(6, amp=0.2)}
    dec = decompose(store, saes, split=SPLIT, interval_site=SITE, interval_blocks=4)
    gram = dec.norm_grams[SITE]
    assert len(gram.blocks) == 4
    intervals = scaling_intervals(gram, ["small", "big"])
    low, high = intervals["r2"][0][1]
    point = scaling_between_saes(gram, ["small", "big"])["r2"][0][1]
    assert low < point < high and intervals["r2"][1][0] is None
    block_of = [(c // store.shard_contexts) * 4 // store.n_shards for c in range(store.n_contexts)]
    others = np.asarray([c for c in range(store.n_contexts) if block_of[c] != 1])
    loo = decompose(store, saes, split=SPLIT, contexts=others).norm_grams[SITE]
    want = scaling_between_saes(loo, ["small", "big"])["r2"][0][1]
    got = scaling_between_saes(gram.without(1), ["small", "big"])["r2"][0][1]
    assert got == pytest.approx(want, rel=1e-6)
