"""The pursuit step measures FVU_nonlinear with the engine's probes, never a refit on its few contexts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from darkmatter.config import resolve_config
from darkmatter.experiments.decomposition import decompose
from darkmatter.experiments.fixed_probes import fvu_with_probes
from darkmatter.sae.model import SAE, SAEConfig
from darkmatter.study.context import StudyContext
from darkmatter.study.probes import save_probe
from darkmatter.study.steps.pursuit import PURSUIT, spread_contexts
from synthetic import sparse_features, synthetic_store

SITE = "blocks.0.hook_resid_post"
D, W, K = 16, 32, 4


def _sae(seed: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(W, D, generator=g)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    cfg = SAEConfig(d_in=D, d_sae=W, activation="topk", k=K, hook_site=SITE)
    return SAE.from_tensors(
        cfg, {"W_enc": w_dec.T.clone(), "b_enc": torch.zeros(W), "W_dec": w_dec, "b_dec": torch.zeros(D)}
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("pursuit-step") / "store"
    return synthetic_store(path, sparse_features(d=D, n_features=48, active=3), n_contexts=40, ctx_len=32)


def test_pursuit_uses_the_engine_probes(store, tmp_path: Path) -> None:
    cfg = resolve_config("tiny", overrides=["layer=0", f"family.k={K}", "pursuit.n_contexts=6"])
    ctx = StudyContext(cfg, tmp_path, log=lambda _m: None)
    saes = {f"L0.resid.w{W}.k{K}": _sae(0)}
    ctx.use_store(store)
    ctx.use_family(saes)
    engine = decompose(store, saes, split=ctx.split, second_pass=False)
    for name, (weights, bias) in engine.probes.items():
        save_probe(ctx.paths.probe(name), weights, bias)
    (row,) = PURSUIT.run(ctx).saes
    contexts = spread_contexts(6, store.n_contexts)
    assert len(contexts) == 6 and contexts[-1] == store.n_contexts - 1
    direct, _ = fvu_with_probes(store, saes, engine.probes, split=ctx.split, contexts=contexts)
    assert row.fvu_nonlinear == pytest.approx(direct[row.name].fvu_nonlinear, rel=1e-7)
    assert row.fvu == pytest.approx(direct[row.name].fvu, rel=1e-6)
    refit = decompose(store, saes, split=ctx.split, second_pass=False, contexts=contexts)
    assert row.refit_fvu_nonlinear == pytest.approx(refit.stats[row.name].fvu_nonlinear, rel=1e-9)
    assert row.refit_fvu_nonlinear > row.fvu_nonlinear + 1e-3  # a refit on 6 contexts overfits
    assert row.encoder_error == pytest.approx(row.refit_fvu_nonlinear - row.refit_pursuit_fvu_nonlinear)
    assert row.pursuit_fvu_nonlinear == pytest.approx(row.fvu_nonlinear - row.encoder_error)
    assert row.pursuit_fvu < row.fvu
    assert store.n_shards == 5  # paired jackknife: both probes refitted without each block of contexts
    low, high = row.intervals["encoder_error"]
    assert low < row.encoder_error < high
    low, high = row.intervals["fvu_drop"]
    assert low < row.fvu - row.pursuit_fvu < high


def test_with_every_context_the_engine_probe_gives_the_engine_number(store) -> None:
    saes = {"a": _sae(1)}
    split = resolve_config("tiny").split
    engine = decompose(store, saes, split=split, second_pass=False)
    fits, n_test = fvu_with_probes(store, saes, engine.probes, split=split)
    assert n_test == engine.n_test
    assert fits["a"].fvu == pytest.approx(engine.stats["a"].fvu, rel=1e-6)
    assert fits["a"].fvu_nonlinear == pytest.approx(engine.stats["a"].fvu_nonlinear, rel=1e-5)
