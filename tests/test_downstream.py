"""downstream_ce: the exactness check, explicit CE, prefix replay = full forward, formulas, bad inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from darkmatter.errors import ConfigError, DataError, HookSiteError, ShapeError
from darkmatter.experiments.downstream import (
    ComponentShares,
    DownstreamResult,
    ce_scores,
    check_both,
    downstream_ce,
    record_layer_outputs,
    replay_prefix,
)
from darkmatter.lm.hooks import capture, run, splice
from darkmatter.report.intervention_sections import downstream_section
from darkmatter.sae.model import SAE, SAEConfig
from darkmatter.stats.jackknife import jackknife_interval

from conftest import ARCHS, tiny_model

D = 64
SITE = "blocks.1.hook_resid_post"
START = 6


def topk_sae(seed: int = 0, site: str = SITE, d_in: int = D, width: int = 128, k: int = 8) -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=d_in, d_sae=width, activation="topk", k=k, hook_site=site)
    return SAE.from_tensors(
        cfg,
        {
            "W_enc": torch.randn(d_in, width, generator=g) / math.sqrt(d_in),
            "b_enc": torch.zeros(width),
            "W_dec": torch.randn(width, d_in, generator=g) / math.sqrt(width) * 2,
            "b_dec": torch.randn(d_in, generator=g) * 0.1,
        },
    )


def identity_sae(site: str = SITE) -> SAE:
    """relu(x) − relu(−x) = x exactly: a perfect reconstruction."""
    eye = torch.eye(D)
    cfg = SAEConfig(d_in=D, d_sae=2 * D, activation="relu", hook_site=site, apply_b_dec_to_input=False)
    return SAE.from_tensors(
        cfg,
        {
            "W_enc": torch.cat([eye, -eye], 1),
            "b_enc": torch.zeros(2 * D),
            "W_dec": torch.cat([eye, -eye], 0),
            "b_dec": torch.zeros(D),
        },
    )


def contexts(n: int = 5, t: int = 24, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, 60, size=(n, t)).astype(np.int32)


def site_acts(model: torch.nn.Module, tokens: np.ndarray, site: str) -> torch.Tensor:
    with torch.no_grad(), capture(model, [site]) as cap:
        run(model, input_ids=torch.as_tensor(tokens.astype(np.int64)))
    return cap.acts[site].reshape(-1, D)


def fitted_probe(model: torch.nn.Module, sae: SAE, site: str = SITE) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares error probe with bias, on other contexts than the evaluated ones."""
    x = site_acts(model, contexts(8, 24, seed=99), site).double()
    e = x - sae(x.float()).double()
    xt = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    sol = torch.linalg.lstsq(xt, e).solution
    return sol[:-1].float(), sol[-1].float()


def explicit_ce(model: torch.nn.Module, tokens: np.ndarray, replace=None, site: str = SITE) -> float:
    """Mean CE over positions START .. T−2 with a plain full forward (and an optional splice)."""
    ids = torch.as_tensor(tokens.astype(np.int64))
    with torch.no_grad():
        if replace is None:
            logits = model(input_ids=ids).logits
        else:
            with splice(model, site, replace, start=START):
                logits = model(input_ids=ids).logits
    lp = F.log_softmax(logits[:, START:-1].double(), -1)
    return float(-lp.gather(-1, ids[:, START + 1 :, None]).mean())


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def result(model: torch.nn.Module) -> tuple[DownstreamResult, dict[str, SAE], dict]:
    saes = {"topk": topk_sae(), "identity": identity_sae()}
    probes = {n: fitted_probe(model, s) for n, s in saes.items()}
    mean = site_acts(model, contexts(4, 24, seed=7), SITE).mean(0)
    res = downstream_ce(model, contexts(), saes, probes, start=START, batch_size=2, mean_acts={SITE: mean})
    return res, saes, probes


def test_both_equals_clean_and_zero_differs(result) -> None:
    res, _, _ = result
    r = res.saes["topk"]
    assert set(r.ce) == {"clean", "sae", "sae+linear", "sae+nonlinear", "sae+both", "zero", "mean"}
    assert abs(r.ce["sae+both"] - r.ce["clean"]) < 1e-4
    assert r.both_max_abs_ce_diff < 1e-4 and r.both_mean_ce_diff < 1e-4
    assert r.kl["sae+both"] < 1e-6
    assert abs(r.ce["zero"] - r.ce["clean"]) > 1e-3 and r.kl["zero"] > 1e-4
    assert r.kl["sae"] > r.kl["sae+both"]
    assert res.scored_tokens == 5 * (24 - START - 1) == r.both_scored_tokens
    # 3 batches: clean, 2 SAEs x 4 settings, and zero and mean ablation once for the site they share
    assert res.forward_passes == 3 * (1 + 2 * 4 + 2)
    other = res.saes["identity"]
    assert other.ce["zero"] == r.ce["zero"] and other.ce["mean"] == r.ce["mean"]


def test_identity_sae_recovers_clean_exactly(result) -> None:
    res, _, _ = result
    r = res.saes["identity"]
    assert r.ce["sae"] == r.ce["clean"] and r.kl["sae"] < 1e-9
    assert r.ce_recovered_linear is None and r.ce_recovered_nonlinear is None  # L_sae − L_clean = 0
    assert r.fvu_sae == 0.0 and r.variance_share_linear is None and r.norm_share_linear is None
    assert r.ce_loss_score == pytest.approx(1.0)


def test_matches_explicit_full_forward(model, result) -> None:
    res, saes, probes = result
    sae, (w, b) = saes["topk"], probes["topk"]
    toks = contexts()
    assert res.clean_ce == pytest.approx(explicit_ce(model, toks), abs=1e-5)
    r = res.saes["topk"]
    assert r.ce["sae"] == pytest.approx(explicit_ce(model, toks, lambda x: sae(x)), abs=1e-5)
    lin = explicit_ce(model, toks, lambda x: sae(x) + x @ w + b)
    assert r.ce["sae+linear"] == pytest.approx(lin, abs=1e-5)
    nonlin = explicit_ce(model, toks, lambda x: x - (x @ w + b))
    assert r.ce["sae+nonlinear"] == pytest.approx(nonlin, abs=1e-5)
    assert r.ce["zero"] == pytest.approx(explicit_ce(model, toks, torch.zeros_like), abs=1e-5)
    scores = ce_scores(r.ce, r.kl)
    assert r.ce_recovered_linear == pytest.approx(scores["ce_recovered_linear"])
    assert r.ce_loss_score_mean is not None


def test_ce_intervals_are_delete_one_context_jackknife(model, result) -> None:
    """Each replicate is a fresh run on the contexts without one; too few contexts give no interval."""
    res, saes, probes = result
    toks = contexts()
    replicates: dict[str, list[float]] = {"lin": [], "nl": []}
    for c in range(len(toks)):
        others = np.delete(toks, c, 0)
        rest = downstream_ce(model, others, saes, probes, start=START, batch_size=2).saes["topk"]
        replicates["lin"].append(rest.ce_recovered_linear or math.nan)
        replicates["nl"].append(rest.ce_recovered_nonlinear or math.nan)
    r = res.saes["topk"]
    lin, nl = r.ce_recovered_linear or math.nan, r.ce_recovered_nonlinear or math.nan
    pairs = list(zip(replicates["lin"], replicates["nl"], strict=True))
    expected = {
        "ce_recovered_linear": (lin, replicates["lin"]),
        "ce_recovered_nonlinear": (nl, replicates["nl"]),
        "ce_recovered_sum": (
            lin + nl,
            [a + b for a, b in pairs],
        ),
        "ce_recovered_gap": (
            lin - nl,
            [a - b for a, b in pairs],
        ),
    }
    assert set(r.intervals) == set(expected)
    for key, (point, values) in expected.items():
        low, high = jackknife_interval(point, values)
        assert r.intervals[key] == pytest.approx([low, high], rel=1e-6, abs=1e-9)
        assert low < point < high
    assert res.saes["identity"].intervals == {}  # L_sae = L_clean: no CE recovered to bound
    two = downstream_ce(model, toks[:2], saes, probes, start=START, batch_size=2)
    assert two.saes["topk"].intervals == {}


def test_shares_match_explicit_on_scored_positions(model, result) -> None:
    res, saes, probes = result
    sae, (w, b) = saes["topk"], probes["topk"]
    x = site_acts(model, contexts(), SITE).reshape(5, 24, D)[:, START:-1].reshape(-1, D).double()
    e = x - sae(x.float()).double()
    lin = x @ w.double() + b.double()
    nl = e - lin
    r = res.saes["topk"]
    se, sl, sn = (float(t.pow(2).sum()) for t in (e, lin, nl))
    assert r.variance_share_linear == pytest.approx(1 - sn / se, rel=1e-4)
    assert r.variance_share_nonlinear == pytest.approx(1 - sl / se, rel=1e-4)
    assert r.norm_share_linear == pytest.approx(
        float(lin.norm(dim=1).mean() / e.norm(dim=1).mean()), rel=1e-5
    )
    var_x = float((x - x.mean(0)).pow(2).sum())
    assert r.fvu_sae == pytest.approx(se / var_x, rel=1e-5)


@pytest.mark.parametrize("kind", ["hook_resid_post", "hook_resid_pre", "hook_mlp_out", "hook_attn_out"])
def test_prefix_cache_equals_full_forward(model, kind: str) -> None:
    site = f"blocks.1.{kind}"
    sae = topk_sae(seed=1, site=site)
    probe = fitted_probe(model, sae, site)
    kw = {"start": START, "batch_size": 3}
    fast = downstream_ce(model, contexts(4), {"s": sae}, {"s": probe}, **kw).saes["s"]
    slow = downstream_ce(model, contexts(4), {"s": sae}, {"s": probe}, prefix_cache=False, **kw).saes["s"]
    for setting in fast.ce:
        assert fast.ce[setting] == pytest.approx(slow.ce[setting], abs=1e-6)
    for setting in fast.kl:
        assert fast.kl[setting] == pytest.approx(slow.kl[setting], abs=1e-7)


@pytest.mark.parametrize("arch", ARCHS)
def test_replayed_prefix_is_bit_exact(arch: str) -> None:
    m = tiny_model(arch)
    ids = torch.as_tensor(contexts(2, 16).astype(np.int64))
    calls: list[int] = []
    for i, layer in enumerate(m.base_model.h if arch == "gpt2" else m.base_model.layers):
        layer.register_forward_pre_hook(lambda *_a, i=i: calls.append(i))
    with torch.no_grad():
        with record_layer_outputs(m, [1]) as rec:
            clean = m(input_ids=ids).logits
        calls.clear()
        with replay_prefix(m, 2, rec[1]), splice(m, SITE, lambda x: x, start=4):
            again = m(input_ids=ids).logits
        assert torch.equal(clean, again)
        assert calls == [0, 1, 2]  # hooks still fire on replayed layers
        after = m(input_ids=ids).logits  # forward restored
    assert torch.equal(clean, after)
    assert all(
        "forward" not in layer.__dict__
        for layer in (m.base_model.h if arch == "gpt2" else m.base_model.layers)
    )


def test_ce_scores_hand_values() -> None:
    ce = {"clean": 2.0, "sae": 3.0, "sae+linear": 2.25, "sae+nonlinear": 2.5, "zero": 6.0, "mean": 4.0}
    s = ce_scores(ce, {"sae": 0.5, "zero": 2.0})
    assert s == pytest.approx(
        {
            "ce_recovered_linear": 0.75,
            "ce_recovered_nonlinear": 0.5,
            "ce_loss_score": 0.75,
            "kl_score": 0.75,
            "ce_loss_score_mean": 0.5,
        }
    )
    degenerate = ce_scores(ce | {"sae": 2.0}, {"sae": 0.0, "zero": 0.0})
    assert degenerate["ce_recovered_linear"] is None and degenerate["kl_score"] is None


def test_component_shares_planted() -> None:
    g = torch.Generator().manual_seed(0)
    n = 500
    th, ph = torch.rand(n, generator=g) * 6.3, torch.rand(n, generator=g) * 6.3
    lin = 3 * torch.stack([th.cos(), th.sin(), torch.zeros(n), torch.zeros(n)], 1)
    nl = 4 * torch.stack([torch.zeros(n), torch.zeros(n), ph.cos(), ph.sin()], 1)
    x = torch.randn(n, 4, generator=g) * 5 + 1
    shares = ComponentShares(4)
    for a in range(0, n, 128):  # streaming in chunks
        sl = slice(a, a + 128)
        shares.update(x[sl], x[sl] - lin[sl] - nl[sl], lin[sl])
    out = shares.compute()
    assert out["variance_share_linear"] == pytest.approx(9 / 25, rel=1e-5)
    assert out["variance_share_nonlinear"] == pytest.approx(16 / 25, rel=1e-5)
    assert out["norm_share_linear"] == pytest.approx(3 / 5, rel=1e-5)
    assert out["norm_share_nonlinear"] == pytest.approx(4 / 5, rel=1e-5)
    var_x = float((x.double() - x.double().mean(0)).pow(2).sum())
    assert out["fvu_sae"] == pytest.approx(25 * n / var_x, rel=1e-5)


def test_both_batches_limits_the_check(model, tmp_path: Path) -> None:
    sae = topk_sae()
    res = downstream_ce(
        model,
        contexts(),
        {"s": sae},
        {"s": fitted_probe(model, sae)},
        start=START,
        batch_size=2,
        both_batches=1,
    )
    r = res.saes["s"]
    assert r.both_scored_tokens == 2 * (24 - START - 1) < res.scored_tokens
    assert res.forward_passes == 3 + 3 * 4 + 1
    assert r.both_mean_ce_diff < 1e-4
    # a check on fewer tokens is not reported beside CEs over all of them
    assert "sae+both" not in r.ce and "sae+both" not in r.kl
    assert {"clean", "sae", "sae+linear", "sae+nonlinear", "zero"} <= set(r.ce)
    html = downstream_section(res, {}, tmp_path)  # the report says where the check ran
    assert f"on {r.both_scored_tokens:,} of the {res.scored_tokens:,} scored tokens" in html


def test_bad_inputs(model) -> None:
    sae, toks = topk_sae(), contexts()
    probe = (torch.zeros(D, D), torch.zeros(D))
    with pytest.raises(HookSiteError):
        downstream_ce(model, toks, {"s": topk_sae(site="blocks.7.hook_resid_post")}, {"s": probe}, start=2)
    with pytest.raises(HookSiteError):
        downstream_ce(model, toks, {"s": topk_sae(site=None)}, {"s": probe}, start=2)  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        downstream_ce(model, toks, {"s": topk_sae(d_in=32)}, {"s": probe}, start=2)
    with pytest.raises(ShapeError):
        downstream_ce(model, toks, {"s": sae}, {"s": (torch.zeros(D, 3), torch.zeros(D))}, start=2)
    with pytest.raises(ConfigError):
        downstream_ce(model, toks, {"s": sae}, {}, start=2)
    with pytest.raises(ConfigError):
        downstream_ce(model, toks, {"s": sae}, {"s": probe}, start=2, batch_size=0)
    for bad, start in (
        (toks, 23),  # no scored position
        (toks[:1], 22),  # a single scored prediction
        (toks[:0], 2),  # no contexts
        (toks.astype(np.float32), 2),  # not token ids
        (toks + 1000, 2),  # outside the vocabulary
    ):
        with pytest.raises(DataError):
            downstream_ce(model, bad, {"s": sae}, {"s": probe}, start=start)
    with pytest.raises(DataError, match="not exact"):
        check_both("s", 3.0, 2.0, 1e-3)


def test_groups_merge_to_the_one_run(model, result) -> None:
    """SAEs spliced one group at a time (memory budget) give the one run's result (passes aside)."""
    from darkmatter.study.steps.downstream_ce import merge_groups

    whole, saes, probes = result
    mean = site_acts(model, contexts(4, 24, seed=7), SITE).mean(0)
    parts = [
        downstream_ce(
            model, contexts(), {n: s}, {n: probes[n]}, start=START, batch_size=2, mean_acts={SITE: mean}
        )
        for n, s in saes.items()
    ]
    merged = merge_groups(parts)
    assert merged.forward_passes > whole.forward_passes
    volatile = {"seconds", "forward_passes", "provenance", "created"}
    a = whole.model_dump(exclude=volatile)
    b = merged.model_dump(exclude=volatile)
    for row in (*a["saes"].values(), *b["saes"].values()):
        row.pop("seconds")
    assert a == b
