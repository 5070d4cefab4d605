"""earlier_layer_predictors against explicit lstsq, its jackknife intervals against refits without each
block, the joint map and its CE splice, and the MLP probe."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from darkmatter.errors import ConfigError, DataError, HookSiteError, ShapeError, StoreError
from darkmatter.experiments.earlier_layers import (
    JOINT,
    SELF,
    TARGETS,
    JointMap,
    downstream_ce_with_joint,
    earlier_layer_predictors,
    joint_replacement,
    mlp_probe,
)
from darkmatter.lm.hooks import capture, splice
from darkmatter.sae.model import SAE, SAEConfig
from darkmatter.stats import Split
from darkmatter.stats.jackknife import finite_interval
from darkmatter.store import ActivationStore
from synthetic import synthetic_store

from conftest import tiny_model

D = 12
PREV, ATTN, MLP, RESID = (
    "blocks.0.hook_resid_post",
    "blocks.1.hook_attn_out",
    "blocks.1.hook_mlp_out",
    "blocks.1.hook_resid_post",
)
SEED, FRACTION = 3, 0.7
SPLIT = Split(SEED, FRACTION)


def components(d: int = D, seed: int = 0):
    """prev: sparse features; attn: a linear map of prev plus its own features; mlp: a ReLU of both."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(48, d, generator=g)
    a_map = torch.randn(d, d, generator=g) * 0.3
    m_map = torch.randn(2 * d, d, generator=g) * 0.3

    def sparse(gen: torch.Generator, n: int) -> torch.Tensor:
        codes = torch.rand(n, 48, generator=gen) * (torch.rand(n, 48, generator=gen) < 0.08)
        return codes @ dirs

    def make(gen: torch.Generator, n_ctx: int, ctx_len: int) -> dict[str, torch.Tensor]:
        n = n_ctx * ctx_len
        prev = sparse(gen, n) + 0.5
        attn = prev @ a_map + 0.5 * sparse(gen, n)
        mlp = torch.relu(torch.cat([prev, attn], 1) @ m_map) + 0.05 * torch.randn(n, d, generator=gen)
        out = {PREV: prev, ATTN: attn, MLP: mlp, RESID: prev + attn + mlp}
        return {k: v.reshape(n_ctx, ctx_len, d) for k, v in out.items()}

    return make


def topk_sae(site: str, seed: int, d_in: int = D, width: int = 32, k: int = 4) -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=d_in, d_sae=width, activation="topk", k=k, hook_site=site)
    return SAE.from_tensors(
        cfg,
        {
            "W_enc": torch.randn(d_in, width, generator=g) / math.sqrt(d_in),
            "b_enc": torch.zeros(width),
            "W_dec": torch.randn(width, d_in, generator=g) / math.sqrt(width) * 2,
            "b_dec": torch.zeros(d_in),
        },
    )


def all_rows(store: ActivationStore, sites: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
    train = []
    for b in store.iter_batches(sites, batch_tokens=300):
        for s in sites:
            parts[s].append(b.acts[s].double())
        train.append(SPLIT.mask(b.context, b.position))
    return {s: torch.cat(v) for s, v in parts.items()}, torch.cat(train)


def lstsq(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    return torch.linalg.lstsq(xt, y, driver="gelsd").solution


def predict(sol: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ sol[:-1] + sol[-1]


def r2_dims(y: torch.Tensor, pred: torch.Tensor) -> float:
    return float((1 - (y - pred).pow(2).sum(0) / (y - y.mean(0)).pow(2).sum(0)).mean())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    store = synthetic_store(tmp_path_factory.mktemp("el") / "store", components(), n_contexts=30, ctx_len=40)
    target = topk_sae(RESID, 0)
    regs = {"prev residual": topk_sae(PREV, 1), "attention": topk_sae(ATTN, 2), "MLP": topk_sae(MLP, 3)}
    rows, train = all_rows(store, [PREV, ATTN, MLP, RESID])
    x = rows[RESID]
    e = x - target(x.float()).double()
    probe_sol = lstsq(x[train], e[train])
    probe = (probe_sol[:-1].float(), probe_sol[-1].float())
    res = earlier_layer_predictors(store, target, probe, regs, split=SPLIT, batch_tokens=256)
    return store, target, regs, probe, res, rows, train


def test_r2_matches_explicit_lstsq(setup) -> None:
    _store, target, regs, (w, b), res, rows, train = setup
    x = rows[RESID]
    sae_x = target(x.float()).double()
    e = x - sae_x
    lin = x @ w.double() + b.double()
    ys = {"nonlinear": e - lin, "error": e, "linear": lin}
    inputs = {n: s(rows[s.cfg.hook_site].float()).double() for n, s in regs.items()} | {SELF: sae_x}
    inputs[JOINT] = torch.cat([inputs[n] for n in [*regs, SELF]], 1)
    assert res.regressors == [*regs, SELF, JOINT]
    assert res.n_train == int(train.sum()) and res.n_test == int((~train).sum())
    te = ~train
    var_x = float((x[te] - x[te].mean(0)).pow(2).sum())
    for name, z in inputs.items():
        for t in TARGETS:
            sol = lstsq(z[train], ys[t][train])
            assert res.r2[name][t] == pytest.approx(r2_dims(ys[t][te], predict(sol, z[te])), abs=1e-6)
            if t == "error":
                ss_res = float((ys[t][te] - predict(sol, z[te])).pow(2).sum())
                assert res.fvu_with[name] == pytest.approx(ss_res / var_x, rel=1e-6)
    assert res.fvu_sae == pytest.approx(float(e[te].pow(2).sum()) / var_x, rel=1e-6)
    assert res.fvu_sae_linear == pytest.approx(float(ys["nonlinear"][te].pow(2).sum()) / var_x, rel=1e-6)
    sol = lstsq(inputs[JOINT][train], ys["nonlinear"][train])
    nl_res = float((ys["nonlinear"][te] - predict(sol, inputs[JOINT][te])).pow(2).sum())
    assert res.fvu_sae_linear_joint == pytest.approx(nl_res / var_x, rel=1e-6)


def test_joint_is_at_least_as_good_on_train(setup) -> None:
    *_, res, _rows, _train = setup
    for t in TARGETS:
        for name in res.regressors:
            assert res.r2_train[JOINT][t] >= res.r2_train[name][t] - 1e-9
    assert res.fvu_with[JOINT] < res.fvu_sae  # the joint map improves the reconstruction here


def test_joint_replacement_and_save_load(setup, tmp_path: Path) -> None:
    _store, target, regs, _probe, res, rows, _train = setup
    jm = res.joint_map
    assert jm is not None and [b[0] for b in jm.blocks] == [*regs, SELF]
    x = rows[RESID][:50].float()
    acts = {s: rows[s][:50].float() for s in (PREV, ATTN, MLP)}
    sae_x = target(x)
    z = torch.cat([regs[n](acts[s]) for n, s, _ in jm.blocks[:-1]] + [sae_x], 1)
    expected = sae_x + z @ jm.weights + jm.bias
    torch.testing.assert_close(joint_replacement(x, acts, target, regs, jm), expected)
    jm.save(tmp_path / "joint.safetensors")
    back = JointMap.load(tmp_path / "joint.safetensors")
    assert back.blocks == jm.blocks and back.target_site == RESID
    assert torch.equal(back.weights, jm.weights) and torch.equal(back.bias, jm.bias)
    with pytest.raises(ShapeError):
        joint_replacement(x, acts, target, regs | {"MLP": topk_sae(ATTN, 3)}, jm)


def test_bad_inputs(setup, tmp_path: Path) -> None:
    store, target, regs, probe, *_ = setup
    kw = {"split": SPLIT}
    with pytest.raises(ConfigError):
        earlier_layer_predictors(store, target, probe, {SELF: regs["MLP"]}, **kw)
    with pytest.raises(StoreError):
        earlier_layer_predictors(store, target, probe, {"x": topk_sae("blocks.2.hook_mlp_out", 0)}, **kw)
    with pytest.raises(ShapeError):
        earlier_layer_predictors(store, target, probe, {"x": topk_sae(MLP, 0, d_in=8)}, **kw)
    with pytest.raises(ShapeError):
        earlier_layer_predictors(store, target, (probe[0][:3], probe[1]), regs, **kw)
    small = synthetic_store(tmp_path / "small", components(), n_contexts=2, ctx_len=16)
    with pytest.raises(DataError):  # 32 tokens for a 48-column joint regression
        earlier_layer_predictors(small, target, probe, regs, **kw)


# --------------------------------------------------------------------------- jackknife intervals


def _flat(res) -> dict[str, float]:
    """Every point estimate of a result, by name."""
    out = {"fvu_sae": res.fvu_sae, "fvu_sae_linear": res.fvu_sae_linear, "joint_nl": res.fvu_sae_linear_joint}
    for table in ("r2", "r2_variance_weighted", "r2_train"):
        for r, row in getattr(res, table).items():
            out |= {f"{table}.{r}.{t}": v for t, v in row.items()}
    return out | {f"fvu_with.{r}": v for r, v in res.fvu_with.items()}


def test_blocks_leave_the_point_estimates_unchanged(setup) -> None:
    """One block is the old single accumulator (bitwise); four blocks (one per shard) only reorder sums."""
    store, target, regs, probe, res, *_ = setup
    assert store.n_shards == 4 and res.interval_blocks == 4 and res.intervals
    one = earlier_layer_predictors(
        store, target, probe, regs, split=SPLIT, batch_tokens=256, interval_blocks=1
    )
    assert one.interval_blocks == 0 and not (one.intervals or one.gap_intervals or one.jackknife)
    blocked, single = _flat(res), _flat(one)
    assert blocked.keys() == single.keys()
    for k, v in single.items():
        assert blocked[k] == pytest.approx(v, rel=1e-11, abs=1e-12), k
    assert (res.n_train, res.n_test) == (one.n_train, one.n_test)


def _without_block(monkeypatch: pytest.MonkeyPatch, store: ActivationStore, shard: int) -> None:
    """Make ``store`` stream every context but those of ``shard`` (the block a 4-block run leaves out)."""
    start, stop = store.shard_range(shard)
    kept = np.asarray([c for c in range(store.n_contexts) if not start <= c < stop])
    monkeypatch.setattr(store, "iter_batches", functools.partial(store.iter_batches, contexts=kept))


def test_replicates_equal_refits_without_the_block(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    store, target, regs, probe, res, *_ = setup
    kw = {"split": SPLIT, "batch_tokens": 256, "interval_blocks": 1}
    refits = []
    for b in range(store.n_shards):  # 4 shards, 4 blocks: block b is shard b
        with monkeypatch.context() as m:
            _without_block(m, store, b)
            refits.append(earlier_layer_predictors(store, target, probe, regs, **kw))
        assert refits[-1].n_test + refits[-1].n_train < res.n_train + res.n_test
    for r in res.regressors:
        for t in TARGETS:
            want = [f.r2[r][t] for f in refits]
            assert res.jackknife[r][t] == pytest.approx(want, abs=1e-8), (r, t)
            ci = finite_interval(res.r2[r][t], want)
            assert ci is not None and res.intervals[r][t] == pytest.approx(ci, abs=1e-8)
        gaps = [f.r2[r]["linear"] - f.r2[r]["nonlinear"] for f in refits]
        ci = finite_interval(res.r2[r]["linear"] - res.r2[r]["nonlinear"], gaps)
        assert ci is not None and res.gap_intervals[r] == pytest.approx(ci, abs=1e-8)
    for key, point in (("sae", res.fvu_sae), (JOINT, res.fvu_with[JOINT])):
        want = [f.fvu_sae if key == "sae" else f.fvu_with[JOINT] for f in refits]
        ci = finite_interval(point, want)
        assert ci is not None and res.fvu_intervals[key] == pytest.approx(ci, rel=1e-8)


def test_intervals_cover_the_estimate_and_shrink_with_more_contexts(setup, tmp_path: Path) -> None:
    _store, target, regs, probe, *_ = setup
    widths: dict[int, list[float]] = {}
    for n_ctx in (32, 128):  # 4 blocks of 1 shard, then of 4 shards each
        store = synthetic_store(tmp_path / f"s{n_ctx}", components(), n_contexts=n_ctx, ctx_len=40)
        res = earlier_layer_predictors(
            store, target, probe, regs, split=SPLIT, batch_tokens=512, interval_blocks=4
        )
        assert res.interval_blocks == 4
        widths[n_ctx] = []
        for r in res.regressors:
            for t in TARGETS:
                low, high = res.intervals[r][t]
                assert low < res.r2[r][t] < high
                widths[n_ctx].append(high - low)
            low, high = res.gap_intervals[r]
            assert low < res.r2[r]["linear"] - res.r2[r]["nonlinear"] < high
        for key, point in (("sae", res.fvu_sae), (JOINT, res.fvu_with[JOINT])):
            assert res.fvu_intervals[key][0] < point < res.fvu_intervals[key][1]
    ratios = sorted(b / a for a, b in zip(widths[32], widths[128], strict=True))
    assert 0.3 < ratios[len(ratios) // 2] < 0.75  # 4x the contexts: about half as wide


def test_too_few_usable_blocks_give_no_interval(setup, tmp_path: Path) -> None:
    store, target, regs, probe, *_ = setup
    kw = {"split": SPLIT, "batch_tokens": 256}
    two = earlier_layer_predictors(store, target, probe, regs, interval_blocks=2, **kw)
    assert two.interval_blocks == 0 and two.intervals == {} and two.gap_intervals == {}
    assert two.fvu_intervals == {} and two.jackknife == {}
    # 3 shards of 2 contexts: the joint fit (49 coefficients) runs on ~67 train tokens, not without a shard
    small = synthetic_store(tmp_path / "small", components(), n_contexts=6, ctx_len=16, shard_contexts=2)
    res = earlier_layer_predictors(small, target, probe, regs, **kw)
    assert res.n_train > 49 and res.r2[JOINT] and res.intervals == {} and res.gap_intervals == {}


# --------------------------------------------------------------------------- CE with the joint map

LM_D = 64


def random_joint_map(target: SAE, regs: dict[str, SAE], scale: float = 0.05) -> JointMap:
    blocks = [(n, str(s.cfg.hook_site), LM_D) for n, s in regs.items()] + [
        (SELF, str(target.cfg.hook_site), LM_D)
    ]
    g = torch.Generator().manual_seed(5)
    return JointMap(
        str(target.cfg.hook_site),
        blocks,
        torch.randn(LM_D * len(blocks), LM_D, generator=g) * scale,
        torch.zeros(LM_D),
    )


def test_downstream_ce_with_joint() -> None:
    model = tiny_model("llama")
    target = topk_sae(RESID, 0, d_in=LM_D, width=128, k=8)
    regs = {
        n: topk_sae(s, i + 1, d_in=LM_D, width=128, k=8)
        for i, (n, s) in enumerate([("prev", PREV), ("attn", ATTN), ("mlp", MLP)])
    }
    jm = random_joint_map(target, regs)
    toks = np.random.default_rng(0).integers(2, 60, size=(5, 24))
    probe = (torch.randn(LM_D, LM_D, generator=torch.Generator().manual_seed(1)) * 0.05, torch.zeros(LM_D))
    kw = {"start": 6, "batch_size": 2, "probe": probe}
    fast = downstream_ce_with_joint(model, toks, target, regs, jm, **kw)
    slow = downstream_ce_with_joint(model, toks, target, regs, jm, prefix_cache=False, **kw)
    assert set(fast.ce) == {"clean", "sae", "sae+joint", "sae+joint+rest", "zero", "sae+linear"}
    for k in fast.ce:
        assert fast.ce[k] == pytest.approx(slow.ce[k], abs=1e-6)
    assert fast.both_mean_ce_diff < 1e-4 and fast.both_max_abs_ce_diff < 1e-4
    assert abs(fast.ce["sae+joint"] - fast.ce["sae"]) > 1e-5 and fast.ce_recovered_joint is not None

    # the regressor sites run before the spliced site: capture them in the same forward, splice at RESID
    ids = torch.as_tensor(toks)
    with torch.no_grad(), capture(model, [PREV, ATTN, MLP]) as cap:

        def replace(x: torch.Tensor) -> torch.Tensor:
            acts = {s: cap.acts[s][:, 6:].reshape(-1, LM_D) for s in (PREV, ATTN, MLP)}
            return joint_replacement(x, acts, target, regs, jm)

        with splice(model, RESID, replace, start=6):
            logits = model(input_ids=ids).logits
    lp = F.log_softmax(logits[:, 6:-1].double(), -1)
    assert fast.ce["sae+joint"] == pytest.approx(float(-lp.gather(-1, ids[:, 7:, None]).mean()), abs=1e-5)

    late = {"late": topk_sae("blocks.2.hook_resid_post", 9, d_in=LM_D, width=128, k=8)}
    with pytest.raises(HookSiteError):
        downstream_ce_with_joint(model, toks, target, late, random_joint_map(target, late), start=6)


# --------------------------------------------------------------------------- MLP probe


def relu_sae(d: int, site: str) -> SAE:
    """Sae(x) = relu(x), so SaeError = min(x, 0): its |x| part is invisible to a linear probe."""
    cfg = SAEConfig(d_in=d, d_sae=d, activation="relu", hook_site=site, apply_b_dec_to_input=False)
    eye = torch.eye(d)
    return SAE.from_tensors(
        cfg, {"W_enc": eye, "b_enc": torch.zeros(d), "W_dec": eye, "b_dec": torch.zeros(d)}
    )


def test_mlp_probe_finds_planted_nonlinear_error(tmp_path: Path) -> None:
    d = 6

    def make(gen: torch.Generator, n_ctx: int, ctx_len: int) -> dict[str, torch.Tensor]:
        return {RESID: torch.randn(n_ctx, ctx_len, d, generator=gen)}

    store = synthetic_store(tmp_path / "s", make, n_contexts=40, ctx_len=50)
    sae = relu_sae(d, RESID)
    rows, train = all_rows(store, [RESID])
    x = rows[RESID]
    sol = lstsq(x[train], (x - torch.relu(x))[train])
    probe = (sol[:-1].float(), sol[-1].float())
    kw = {"hidden": 32, "epochs": 12, "lr": 1e-2, "minibatch": 64, "split": SPLIT}
    out = mlp_probe(store, sae, probe, **kw)
    assert out["n_train"] == int(train.sum()) and out["n_test"] == int((~train).sum())
    assert out["probe_r2_error_mean_over_dims"] < 0.8  # the linear probe misses |x|/2
    assert out["r2_nonlinear_mean_over_dims"] > 0.9
    assert out["r2_error_mean_over_dims"] > out["probe_r2_error_mean_over_dims"]
    assert out["fvu_sae_mlp"] < out["fvu_sae_linear"] < out["fvu_sae"]
    te = ~train
    var_x = float((x[te] - x[te].mean(0)).pow(2).sum())
    nl = (x - torch.relu(x)) - predict(sol, x)
    assert out["fvu_sae_linear"] == pytest.approx(float(nl[te].pow(2).sum()) / var_x, rel=1e-5)
    again = mlp_probe(store, sae, probe, **kw)
    assert again["r2_error_mean_over_dims"] == out["r2_error_mean_over_dims"]  # seeded
    with pytest.raises(ConfigError):
        mlp_probe(store, sae, probe, **(kw | {"hidden": 0}))
    with pytest.raises(ShapeError):
        mlp_probe(store, relu_sae(4, RESID), probe, **kw)
