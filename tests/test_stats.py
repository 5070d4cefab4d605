"""Moments, ridge solve, held-out evaluation from moments, and the deterministic token split."""

from __future__ import annotations

import itertools
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from darkmatter.errors import ConfigError, DataError, ShapeError
from darkmatter.stats import (
    FVU,
    Moments,
    Split,
    evaluate,
    fit_ridge,
    fit_ridge_many,
    fvu_with_prediction,
    is_train,
    token_hash,
)

F64 = torch.float64
PROPS = settings(max_examples=40, deadline=None, derandomize=True)


def make_data(seed: int, n: int, d_x: int, d_y: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well-conditioned x, every other column at mean ~100 and scale 10; y = linear(x) + noise, mean ~50."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(d_x, dtype=F64)
    offset = torch.zeros(d_x, dtype=F64)
    scale[::2], offset[::2] = 10.0, 100.0
    x = torch.randn(n, d_x, generator=g, dtype=F64) * scale + offset + shift
    a = torch.randn(d_x, d_y, generator=g, dtype=F64) / scale[:, None]
    y = x @ a + 0.5 * torch.randn(n, d_y, generator=g, dtype=F64) + 50.0
    return x, y


def chunks_of(n: int, cuts: list[int]) -> list[slice]:
    """Contiguous chunks of range(n) cut at the given points (empty chunks allowed)."""
    bounds = [0, *sorted(min(c, n) for c in cuts), n]
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def accumulate(x: torch.Tensor, y: torch.Tensor, cuts: list[int], **kw: object) -> Moments:
    m = Moments(x.shape[1], {"y": y.shape[1]}, **kw)  # type: ignore[arg-type]
    for s in chunks_of(x.shape[0], cuts):
        m.update(x[s], {"y": y[s]})
    return m


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def lstsq_fit(x: torch.Tensor, y: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    xt = torch.cat([x, torch.ones(x.shape[0], 1, dtype=F64)], 1) if bias else x
    sol = torch.linalg.lstsq(xt, y, driver="gelsd").solution
    return (sol[:-1], sol[-1]) if bias else (sol, None)


shapes = st.tuples(st.integers(1, 6), st.integers(1, 4)).flatmap(
    lambda d: st.tuples(st.just(d[0]), st.just(d[1]), st.integers(4 * d[0] + 12, 160))
)
cut_lists = st.lists(st.integers(0, 160), max_size=6)


# --------------------------------------------------------------------------- streaming == batch


@PROPS
@given(shape=shapes, cuts=cut_lists, bias=st.booleans(), seed=st.integers(0, 2**16))
def test_streaming_fit_matches_one_shot_lstsq(
    shape: tuple[int, int, int], cuts: list[int], bias: bool, seed: int
) -> None:
    d_x, d_y, n = shape
    x, y = make_data(seed, n, d_x, d_y)
    m = accumulate(x, y, cuts)
    xt = torch.cat([x, torch.ones(n, 1, dtype=F64)], 1) if bias else x
    assert m.n == n
    assert rel(m.gram(bias=bias), xt.T @ xt) < 1e-12
    assert rel(m.cross("y", bias=bias), xt.T @ y) < 1e-12
    fit = fit_ridge(m, "y", bias=bias)
    w_ref, b_ref = lstsq_fit(x, y, bias)
    assert fit.n_train == n and fit.escalations == 0 and fit.ridge > 0
    assert rel(fit.weights, w_ref) < 1e-6
    if bias:
        assert fit.bias is not None and b_ref is not None
        assert rel(fit.bias, b_ref) < 1e-6
    else:
        assert fit.bias is None


@PROPS
@given(shape=shapes, cuts_a=cut_lists, cuts_b=cut_lists, seed=st.integers(0, 2**16), order=st.randoms())
def test_moments_independent_of_chunking_and_merge_order(
    shape: tuple[int, int, int], cuts_a: list[int], cuts_b: list[int], seed: int, order: object
) -> None:
    d_x, d_y, n = shape
    x, y = make_data(seed, n, d_x, d_y)
    one = accumulate(x, y, cuts_a)
    two = accumulate(x, y, cuts_b)
    # One partial accumulator per chunk (itself in two sub-chunks, so its reference is not its mean),
    # merged in a shuffled order.
    parts = [accumulate(x[s], y[s], [(s.stop - s.start) // 3]) for s in chunks_of(n, cuts_b)]
    order.shuffle(parts)  # type: ignore[attr-defined]
    merged = Moments(d_x, {"y": d_y})
    for p in parts:
        merged.merge(p)
    for other in (two, merged):
        assert other.n == n
        assert rel(other.centred_gram(), one.centred_gram()) < 1e-12
        assert rel(other.centred_cross("y"), one.centred_cross("y")) < 1e-12
        assert rel(other.mean_x(), one.mean_x()) < 1e-13
        assert rel(other.target_ss_tot("y"), one.target_ss_tot("y")) < 1e-12
        assert rel(other.gram(bias=True), one.gram(bias=True)) < 1e-13
        f1, f2 = fit_ridge(one, "y"), fit_ridge(other, "y")
        assert rel(f2.weights, f1.weights) < 1e-9


@PROPS
@given(shape=shapes, cuts=cut_lists, bias=st.booleans(), seed=st.integers(0, 2**16))
def test_held_out_metrics_from_moments_equal_explicit_residuals(
    shape: tuple[int, int, int], cuts: list[int], bias: bool, seed: int
) -> None:
    d_x, d_y, n = shape
    x, y = make_data(seed, 2 * n, d_x, d_y)
    # Shift the test tokens so the train and test references and means differ.
    x_te, y_te = x[n:] + 0.3, y[n:] - 2.0
    fit = fit_ridge(accumulate(x[:n], y[:n], cuts), "y", bias=bias)
    ev = evaluate(fit, accumulate(x_te, y_te, cuts), "y")
    resid = y_te - fit.predict(x_te)
    ss_res = (resid**2).sum(0)
    ss_tot = ((y_te - y_te.mean(0)) ** 2).sum(0)
    r2 = 1 - ss_res / ss_tot
    assert ev.n_test == n and ev.constant_dims == 0
    assert rel(ev.ss_res, ss_res) < 1e-8
    assert rel(ev.ss_tot, ss_tot) < 1e-10
    assert rel(ev.sum_sq, (y_te**2).sum(0)) < 1e-12
    assert rel(ev.r2_per_dim, r2) < 1e-8
    assert math.isclose(ev.r2_mean_over_dims, float(r2.mean()), rel_tol=1e-8)
    assert math.isclose(ev.r2_variance_weighted, float(1 - ss_res.sum() / ss_tot.sum()), rel_tol=1e-8)


def test_fvu_with_prediction_equals_fvu_of_sae_plus_prediction() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 4000, 6
    x = torch.randn(n, d, generator=g, dtype=F64) * 3 + 20
    x_hat = torch.relu(x - 21) + 0.8 * x  # a nonlinear "SAE": its error has linear and nonlinear parts
    e = x - x_hat
    train, test = Moments(d, {"e": d}), Moments(d, {"e": d})
    train.update(x[:3000], {"e": e[:3000]})
    test.update(x[3000:], {"e": e[3000:]})
    fit = fit_ridge(train, "e")
    ev = evaluate(fit, test, "e")
    direct = FVU(d)
    direct.update(x[3000:], x_hat[3000:] + fit.predict(x[3000:]))
    sae_only = FVU(d)
    sae_only.update(x[3000:], x_hat[3000:])
    fvu_pred = fvu_with_prediction(ev, test.total_variance_x())
    assert math.isclose(fvu_pred, direct.compute(), rel_tol=1e-9)
    assert math.isclose(float(ev.sum_sq.sum()) / test.total_variance_x(), sae_only.compute(), rel_tol=1e-12)
    assert fvu_pred < 0.5 * sae_only.compute()  # the linear part of the error is predicted
    with pytest.raises(DataError, match="total variance"):
        fvu_with_prediction(ev, 0.0)


def test_shift_keeps_centred_moments_exact_at_large_offsets() -> None:
    # Raw sums would cancel ~8 digits here (mean 1e4, unit spread); the first-chunk shift avoids it.
    g = torch.Generator().manual_seed(12)
    x = torch.randn(3000, 4, generator=g, dtype=F64) + 1e4
    y = x[:, :2] * 0.5 + torch.randn(3000, 2, generator=g, dtype=F64) - 3e4
    m = accumulate(x, y, [700, 1900])
    xc, yc = x - x.mean(0), y - y.mean(0)
    assert rel(m.centred_gram(), xc.T @ xc) < 1e-11
    assert rel(m.centred_cross("y"), xc.T @ yc) < 1e-11
    assert rel(m.target_ss_tot("y"), (yc**2).sum(0)) < 1e-11
    assert math.isclose(m.total_variance_x(), float((xc**2).sum()), rel_tol=1e-11)


def test_low_precision_chunks_accumulate_exactly_in_float64() -> None:
    x, y = make_data(3, 300, 5, 2)
    x32, y16 = x.float(), y.to(torch.bfloat16)
    m = Moments(5, {"y": 2})
    for s in chunks_of(300, [100, 200]):
        m.update(x32[s], {"y": y16[s]})
    ref = accumulate(x32.double(), y16.double(), [])
    assert rel(m.gram(bias=True), ref.gram(bias=True)) < 1e-14
    assert rel(m.cross("y"), ref.cross("y")) < 1e-14


def test_pre_shifted_packed_chunks_equal_plain_updates() -> None:
    x, y = make_data(4, 900, 5, 3, shift=1e3)
    plain, packed = Moments(5, {"y": 3}), Moments(5, {"y": 3})
    with pytest.raises(ConfigError, match="needs a reference"):
        packed.update_packed(torch.zeros(10, 8, dtype=F64), shifted=True)
    for s in chunks_of(900, [200, 450]):
        plain.update(x[s], {"y": y[s]})
        buf = torch.cat([x[s], y[s]], 1)
        ref = packed.packed_reference
        if ref is None:
            packed.update_packed(buf)
        else:
            packed.update_packed(buf - ref, shifted=True)
    assert packed.packed_reference is not None
    assert rel(packed.gram(bias=True), plain.gram(bias=True)) < 1e-13
    assert rel(packed.cross("y", bias=True), plain.cross("y", bias=True)) < 1e-13
    assert rel(packed.target_ss_tot("y"), plain.target_ss_tot("y")) < 1e-13
    bad = torch.cat([x[:10], y[:10]], 1) - packed.packed_reference
    bad[2, 6] = math.nan
    with pytest.raises(DataError, match="target 'y'"):
        packed.update_packed(bad, shifted=True)


def test_shared_gram_serves_several_targets_and_matches_separate_fits() -> None:
    x, y = make_data(5, 500, 4, 3)
    norm = y.norm(dim=1)  # a scalar target, passed as 1-D
    m = Moments(4, {"vec": 3, "norm": 1})
    for s in chunks_of(500, [123, 321]):
        m.update(x[s], {"vec": y[s], "norm": norm[s]})
    fits = fit_ridge_many(m)
    assert set(fits) == {"vec", "norm"}
    assert fits["norm"].weights.shape == (4, 1)
    w_ref, b_ref = lstsq_fit(x, norm[:, None], bias=True)
    assert rel(fits["norm"].weights, w_ref) < 1e-6
    assert b_ref is not None and fits["norm"].bias is not None
    assert rel(fits["norm"].bias, b_ref) < 1e-6
    assert torch.equal(fit_ridge(m, "vec").weights, fits["vec"].weights)
    alone = fit_ridge(accumulate(x, y, [200]), "y")  # the extra target block changes nothing
    assert rel(fits["vec"].weights, alone.weights) < 1e-12


# --------------------------------------------------------------------------- planted structure


@pytest.mark.parametrize("bias", [True, False])
def test_planted_linear_structure_recovers_known_r2(bias: bool) -> None:
    g = torch.Generator().manual_seed(1)
    n, d_x, d_y = 40_000, 8, 5
    x = torch.randn(n, d_x, generator=g, dtype=F64)
    a = torch.randn(d_x, d_y, generator=g, dtype=F64)
    a = a / a.norm(dim=0)  # var(x·a_j) = 1, noise var = 1: population R² = 0.5 in every dim
    y = x @ a + torch.randn(n, d_y, generator=g, dtype=F64) + (3.0 if bias else 0.0)
    train_mask = is_train(torch.arange(n) // 100, torch.arange(n) % 100, seed=7, train_fraction=0.5)
    tr, te = Moments(d_x, {"y": d_y}), Moments(d_x, {"y": d_y})
    tr.update(x[train_mask], {"y": y[train_mask]})
    te.update(x[~train_mask], {"y": y[~train_mask]})
    fit = fit_ridge(tr, "y", bias=bias)
    ev = evaluate(fit, te, "y")
    assert abs(ev.r2_mean_over_dims - 0.5) < 0.02
    assert abs(ev.r2_variance_weighted - 0.5) < 0.02
    assert rel(fit.weights, a) < 0.03
    assert float(ev.r2_per_dim.min()) > 0.45


def test_scalar_target_r2() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20_000, 3, generator=g, dtype=F64)
    y = x[:, 0] * 2 + torch.randn(20_000, generator=g, dtype=F64) * 2  # R² = 4 / (4 + 4)
    tr, te = Moments(3, {"n": 1}), Moments(3, {"n": 1})
    tr.update(x[:10_000], {"n": y[:10_000]})
    te.update(x[10_000:], {"n": y[10_000:]})
    ev = evaluate(fit_ridge(tr, "n"), te, "n")
    assert abs(ev.r2 - 0.5) < 0.03
    assert ev.r2 == ev.r2_mean_over_dims
    vec = Moments(3, {"v": 2})
    vec.update(x, {"v": torch.stack([y, -y], 1)})
    with pytest.raises(ShapeError, match="scalar target"):
        _ = evaluate(fit_ridge(vec, "v"), vec, "v").r2


# --------------------------------------------------------------------------- degenerate inputs


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_chunk_raises_naming_the_input_and_leaves_state_unchanged(bad: float) -> None:
    x, y = make_data(0, 60, 3, 2)
    m = Moments(3, {"err": 2})
    m.update(x[:20], {"err": y[:20]})
    before = m.state_dict()
    x_bad = x[20:40].clone()
    x_bad[3, 1] = bad
    with pytest.raises(DataError, match=r"^x in chunk 2 has 1 NaN/inf"):
        m.update(x_bad, {"err": y[20:40]})
    y_bad = y[20:40].clone()
    y_bad[0, 0] = bad
    with pytest.raises(DataError, match="target 'err' in chunk 3"):
        m.update(x[20:40], {"err": y_bad})
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nonfinite_first_chunk_raises() -> None:
    m = Moments(2, {"y": 1})
    with pytest.raises(DataError, match="NaN/inf"):
        m.update(torch.tensor([[1.0, math.nan], [2.0, 3.0]]), {"y": torch.tensor([1.0, 2.0])})
    assert m.n == 0


def test_constant_target_dims_are_excluded_and_counted() -> None:
    x, y = make_data(4, 400, 3, 3)
    y[:, 1] = 0.1  # a constant whose float mean is not exactly 0.1
    tr, te = accumulate(x[:200], y[:200], [77]), accumulate(x[200:], y[200:], [50, 150])
    ev = evaluate(fit_ridge(tr, "y"), te, "y")
    assert ev.constant_dims == 1
    assert math.isnan(float(ev.r2_per_dim[1]))
    expected = float(ev.r2_per_dim[[0, 2]].mean())
    assert math.isclose(ev.r2_mean_over_dims, expected, rel_tol=1e-12)
    assert math.isfinite(ev.r2_variance_weighted)
    y[:, :] = 7.25
    tr, te = accumulate(x[:200], y[:200], []), accumulate(x[200:], y[200:], [])
    with pytest.raises(DataError, match="all 3 dimension"):
        evaluate(fit_ridge(tr, "y"), te, "y")


def test_too_few_train_tokens_raise() -> None:
    x, y = make_data(0, 10, 4, 1)
    with pytest.raises(DataError, match="4 train tokens for 4 coefficients"):
        fit_ridge(accumulate(x[:4], y[:4], []), "y", bias=False)
    with pytest.raises(DataError, match="5 train tokens for 5 coefficients"):
        fit_ridge(accumulate(x[:5], y[:5], []), "y", bias=True)
    assert fit_ridge(accumulate(x[:5], y[:5], []), "y", bias=False).n_train == 5
    with pytest.raises(DataError, match="0 train tokens"):
        fit_ridge(Moments(4, {"y": 1}), "y")
    with pytest.raises(DataError, match="1 test token"):
        evaluate(fit_ridge(accumulate(x, y, []), "y"), accumulate(x[:1], y[:1], []), "y")


def test_rank_deficient_inputs_escalate_an_explicit_zero_ridge() -> None:
    x, y = make_data(6, 200, 4, 2)
    x = torch.cat([x, x[:, :1], torch.zeros(200, 1, dtype=F64)], 1)  # duplicate and all-zero columns
    m = accumulate(x, y, [100])
    fit0 = fit_ridge(m, "y", ridge=0.0)
    assert fit0.escalations >= 1 and fit0.ridge > 0
    fit = fit_ridge(m, "y")
    assert fit.escalations == 0
    assert math.isclose(fit.relative_ridge, 1e-10, rel_tol=1e-12)
    assert math.isclose(float(fit.weights[0, 0]), float(fit.weights[4, 0]), rel_tol=1e-3)  # split evenly
    assert float(fit.weights[5].abs().max()) == 0.0
    w_ref, b_ref = lstsq_fit(x, y, bias=True)
    assert b_ref is not None and fit.bias is not None
    assert rel(fit.predict(x), x @ w_ref + b_ref) < 1e-9
    x_const = accumulate(torch.ones(50, 2, dtype=F64), y[:50], [])
    with pytest.raises(DataError, match="every input dimension is constant"):
        fit_ridge(x_const, "y")


def test_explicit_ridge_is_used_and_reported() -> None:
    x, y = make_data(8, 300, 3, 2)
    m = accumulate(x, y, [])
    fit = fit_ridge(m, "y", ridge=5.0)
    gc = m.centred_gram()
    w = torch.linalg.solve(gc + 5.0 * torch.eye(3, dtype=F64), m.centred_cross("y"))
    assert fit.ridge == 5.0 and rel(fit.weights, w) < 1e-12
    assert math.isclose(fit.ridge_scale, float(gc.diagonal().mean()), rel_tol=1e-12)
    with pytest.raises(ConfigError, match="ridge"):
        fit_ridge(m, "y", ridge=-1.0)


def test_shape_and_name_errors() -> None:
    m = Moments(3, {"a": 2, "b": 1})
    x = torch.zeros(4, 3)
    with pytest.raises(ConfigError, match=r"missing \['b'\]"):
        m.update(x, {"a": torch.zeros(4, 2)})
    with pytest.raises(ShapeError, match="expected 4 rows"):
        m.update(x, {"a": torch.zeros(5, 2), "b": torch.zeros(4)})
    with pytest.raises(ShapeError, match=r"expected shape \[tokens, 3\]"):
        m.update(torch.zeros(4, 2), {"a": torch.zeros(4, 2), "b": torch.zeros(4)})
    with pytest.raises(DataError, match="floating-point"):
        m.update(torch.zeros(4, 3, dtype=torch.int64), {"a": torch.zeros(4, 2), "b": torch.zeros(4)})
    m.update(x[:0], {"a": torch.zeros(0, 2), "b": torch.zeros(0)})  # empty chunk: no-op
    assert m.n == 0
    with pytest.raises(ShapeError, match="layouts differ"):
        m.merge(Moments(3, {"a": 2}))
    fit = fit_ridge(accumulate(*make_data(0, 40, 3, 2), []), "y")
    with pytest.raises(ShapeError, match=r"expected \[3, 3\]"):
        evaluate(fit, accumulate(*make_data(1, 40, 3, 3), []), "y")


def test_state_dict_round_trip_and_merge_into_empty() -> None:
    x, y = make_data(9, 120, 3, 2)
    m = accumulate(x, y, [40])
    state = m.state_dict()
    assert set(state) == {"n", "x.ref", "x.sum", "x.gram", "y.y.ref", "y.y.sum", "y.y.sumsq", "y.y.cross"}
    clone = Moments(3, {"y": 2})
    clone.load_state_dict(state)
    assert clone.n == 120 and rel(clone.centred_gram(), m.centred_gram()) == 0.0
    empty = Moments(3, {"y": 2}).merge(m)
    assert rel(empty.cross("y", bias=True), m.cross("y", bias=True)) == 0.0
    m.merge(Moments(3, {"y": 2}))  # merging an empty accumulator changes nothing
    assert m.n == 120


# --------------------------------------------------------------------------- torch.distributed


def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, y = make_data(11, 300, 4, 3)
    results = {}
    for case, cut in (("split", 170), ("empty_rank", 300)):
        part = slice(0, cut) if rank == 0 else slice(cut, 300)
        m = accumulate(x[part], y[part], [50])
        m.all_reduce_()
        metric = FVU(4)
        if x[part].shape[0]:
            metric.update(x[part], x[part] * 0.9)
        metric.all_reduce_()
        results[case] = (m.n, m.centred_gram(), m.centred_cross("y"), m.mean_target("y"), metric.compute())
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))
    dist.destroy_process_group()


def test_all_reduce_across_two_gloo_ranks_equals_one_process(tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x, y = make_data(11, 300, 4, 3)
    ref = accumulate(x, y, [])
    fvu = FVU(4)
    fvu.update(x, x * 0.9)
    for rank in (0, 1):
        results = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        for n, gram, cross, mean_y, fvu_value in results.values():
            assert n == 300
            assert rel(gram, ref.centred_gram()) < 1e-12
            assert rel(cross, ref.centred_cross("y")) < 1e-12
            assert rel(mean_y, ref.mean_target("y")) < 1e-14
            assert math.isclose(fvu_value, fvu.compute(), rel_tol=1e-12)


def test_all_reduce_without_process_group_is_a_no_op() -> None:
    m = accumulate(*make_data(0, 50, 2, 1), [])
    before = m.centred_gram()
    assert m.all_reduce_() is m and torch.equal(m.centred_gram(), before)


# --------------------------------------------------------------------------- split


def _reference_hash(ctx: int, pos: int, seed: int) -> int:
    """Pure-integer splitmix64 chain, written independently of the tensor limb arithmetic."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    return mix(mix(mix(seed & mask) ^ ctx) ^ pos)


def test_token_hash_matches_integer_reference_including_large_ids() -> None:
    g = torch.Generator().manual_seed(0)
    ctx = torch.cat([torch.randint(0, 2**62, (200,), generator=g), torch.tensor([0, 2**63 - 1, 2**32 - 1])])
    pos = torch.cat([torch.randint(0, 2**40, (200,), generator=g), torch.tensor([0, 2**63 - 1, 2**32])])
    for seed in (0, 12345, 2**64 - 1):
        hi, lo = token_hash(ctx, pos, seed)
        assert int(hi.max()) < 2**32 and int(lo.max()) < 2**32 and int(hi.min()) >= 0
        got = [(int(h) << 32) | int(low) for h, low in zip(hi, lo, strict=True)]
        assert got == [_reference_hash(int(c), int(p), seed) for c, p in zip(ctx, pos, strict=True)]


def test_split_fraction_determinism_and_seed_dependence() -> None:
    ctx = torch.arange(100).repeat_interleave(1000)
    pos = torch.arange(1000).repeat(100)
    mask = is_train(ctx, pos, seed=0, train_fraction=0.8)
    assert mask.dtype == torch.bool and mask.shape == (100_000,)
    assert abs(float(mask.double().mean()) - 0.8) < 0.006
    per_context = mask.view(100, 1000).double().mean(1)
    assert float((per_context - 0.8).abs().max()) < 0.07
    assert torch.equal(mask, is_train(ctx, pos, seed=0, train_fraction=0.8))
    perm = torch.randperm(100_000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(is_train(ctx[perm], pos[perm], seed=0, train_fraction=0.8), mask[perm])
    other = is_train(ctx, pos, seed=1, train_fraction=0.8)
    assert abs(float((other != mask).double().mean()) - 2 * 0.8 * 0.2) < 0.01  # independent splits
    smaller = is_train(ctx, pos, seed=0, train_fraction=0.5)
    assert not bool((smaller & ~mask).any())  # nested: lowering the fraction only removes train tokens
    assert bool(is_train(ctx, pos, 0, 1.0).all()) and not bool(is_train(ctx, pos, 0, 0.0).any())


def test_split_input_errors() -> None:
    ids = torch.arange(4)
    with pytest.raises(DataError, match=">= 0"):
        is_train(ids - 1, ids, 0, 0.5)
    with pytest.raises(DataError, match="integer tensor"):
        is_train(ids.float(), ids, 0, 0.5)
    with pytest.raises(ShapeError, match="differ"):
        is_train(ids, torch.arange(5), 0, 0.5)
    with pytest.raises(ConfigError, match="train_fraction"):
        is_train(ids, ids, 0, 1.5)
    assert is_train(ids[:0], ids[:0], 0, 0.5).shape == (0,)


def test_split_object_is_is_train_and_orders_train_first() -> None:
    ctx = torch.arange(20).repeat_interleave(50)
    pos = torch.arange(50).repeat(20)
    split = Split(seed=7, fraction=0.6)
    mask = split.mask(ctx, pos)
    assert torch.equal(mask, is_train(ctx, pos, 7, 0.6))
    order, n_train = split.train_first(ctx, pos)
    assert n_train == int(mask.sum())
    assert torch.equal(order[:n_train], mask.nonzero().squeeze(1))  # each part keeps its original order
    assert torch.equal(order[n_train:], (~mask).nonzero().squeeze(1))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigError, match="train fraction"):
            Split(seed=0, fraction=bad)
