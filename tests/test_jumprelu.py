"""JumpReLU training: straight-through gradients for θ, FVU falls, L0 near its target, SAELens round trip."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from darkmatter.sae import load_sae, save_sae
from darkmatter.sae.jumprelu import adapt_coef, jumprelu, step
from darkmatter.sae.quality import evaluate_saes
from darkmatter.sae.train import FamilyTrainer, SAESpec, TrainConfig
from darkmatter.stats import Split
from synthetic import sparse_features, synthetic_store

SITE = "blocks.0.hook_resid_post"
SPLIT = Split(seed=0, fraction=0.8)
K = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("jumprelu")
    store = synthetic_store(
        root / "store", sparse_features(d=32, n_features=96, active=4), n_contexts=96, ctx_len=32
    )
    cfg = TrainConfig(epochs=12, batch_size=256, lr=2e-3, dead_tokens=2000, checkpoint_every=1000, aux_k=16)
    spec = SAESpec(name="j", site=SITE, d_sae=64, k=K, kind="jumprelu")
    trainer = FamilyTrainer(store, [spec], cfg, root / "train", split=SPLIT)
    (sae,) = trainer.train()
    return store, trainer, sae


def test_ste_gives_theta_a_gradient_only_near_the_threshold() -> None:
    theta = torch.tensor([1.0, 1.0], requires_grad=True)
    z = torch.tensor([[1.0002, 3.0], [0.9999, 0.2]], requires_grad=True)
    f = jumprelu(z, theta, 0.001)
    torch.testing.assert_close(f.detach(), torch.tensor([[1.0002, 3.0], [0.0, 0.0]]))
    f.sum().backward()
    assert theta.grad is not None and z.grad is not None
    assert theta.grad[0] == pytest.approx(-2 * 1.0 / 0.001)  # both tokens of latent 0 fall in the kernel
    assert theta.grad[1] == 0.0  # latent 1 is far from its threshold on every token
    assert z.grad.tolist() == [[1.0, 1.0], [0.0, 0.0]]
    theta.grad = None
    step(z, theta, 0.001).sum().backward()
    assert theta.grad is not None and theta.grad[0] == pytest.approx(-2 / 0.001) and theta.grad[1] == 0.0


def test_sparsity_coefficient_follows_the_l0() -> None:
    assert adapt_coef(1e-3, 64.0, 32) > 1e-3 > adapt_coef(1e-3, 16.0, 32)
    assert adapt_coef(1e-3, 32.0, 32) == pytest.approx(1e-3)


def test_training_lowers_fvu_and_reaches_target_l0(trained) -> None:
    store, trainer, sae = trained
    m = trainer.members[0]
    assert m.log_threshold is not None and m.log_threshold.grad is not None
    assert bool((m.log_threshold.grad != 0).any())  # θ learns through the straight-through estimators
    val = [h["val_fvu"] for h in m.history if "val_fvu" in h]
    q = evaluate_saes(store, {"j": sae}, split=SPLIT)["j"]
    assert val[-1] < 0.6 * m.history[0]["fvu"]
    assert q["fvu"] < 0.35
    assert 0.6 * K <= q["l0"] <= 1.5 * K
    assert sae.cfg.activation == "jumprelu" and sae.threshold is not None
    assert bool((sae.threshold > 0).all()) and sae.cfg.metadata["target_l0"] == K


def test_saelens_round_trip_reconstructs_identically(trained, tmp_path: Path) -> None:
    store, _, sae = trained
    folder = save_sae(sae, tmp_path / "j")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    back = load_sae(folder)
    assert back.cfg.activation == "jumprelu" and back.threshold is not None
    torch.testing.assert_close(back.threshold, sae.threshold, rtol=0, atol=0)
    x = next(iter(store.iter_batches([SITE], batch_tokens=256))).acts[SITE]
    with torch.no_grad():
        torch.testing.assert_close(back(x), sae(x), rtol=0, atol=0)
    assert not math.isnan(float(back(x).sum()))
