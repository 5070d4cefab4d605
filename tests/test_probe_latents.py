"""Fig 14's norm probe reads Σ f_i d_i in the SAE's own space, so equivalent SAEs give the same answer."""

from __future__ import annotations

import pytest
import torch

from darkmatter.experiments.probe_latents import latent_sum, probe_latents
from darkmatter.sae.model import SAE, SAEConfig
from darkmatter.stats.split import Split
from synthetic import sparse_features, synthetic_store

SITE = "blocks.0.hook_resid_post"
D, W = 16, 48


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("probe") / "store"
    return synthetic_store(path, sparse_features(d=D, n_features=W, active=3), n_contexts=40, ctx_len=32)


def _scaled_sae(scale: float) -> SAE:
    """A TopK SAE that reads x·scale (input scale not folded) and has a large decoder bias."""
    g = torch.Generator().manual_seed(0)
    cfg = SAEConfig(d_in=D, d_sae=W, activation="topk", k=4, hook_site=SITE, input_scale=scale)
    w_dec = torch.randn(W, D, generator=g)
    tensors = {
        "W_enc": w_dec.T.clone(),
        "b_enc": torch.zeros(W),
        "W_dec": w_dec,
        "b_dec": 3.0 * torch.randn(D, generator=g),
    }
    return SAE.from_tensors(cfg, tensors)


def test_latent_sum_is_the_decoder_output_before_its_bias() -> None:
    sae = _scaled_sae(1.0)
    x = torch.randn(10, D)
    x_hat, codes = sae.reconstruct(x)
    torch.testing.assert_close(latent_sum(sae, codes.indices, codes.values) + sae.b_dec, x_hat)


def test_an_unfolded_input_scale_gives_the_same_probe_and_correlation(store) -> None:
    split = Split(0, 0.8)
    unfolded = _scaled_sae(0.25)
    folded = unfolded.fold_input_scale()
    a = probe_latents(store, unfolded, split=split)
    b = probe_latents(store, folded, split=split)
    assert a["n_latents"] == b["n_latents"] > 3
    assert a["probe_r2"] == pytest.approx(b["probe_r2"], abs=1e-6)
    assert a["correlation"] == pytest.approx(b["correlation"], abs=1e-6)
    assert a["correlation_mean"] == pytest.approx(b["correlation_mean"], abs=1e-6)
