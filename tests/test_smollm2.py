"""Integration: the embedded SmolLM2 model over a few hundred tokens of Austen."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from darkmatter.cli import main
from darkmatter.lm.hooks import capture, run
from darkmatter.lm.loading import EMBEDDED_GGUF_SHA256, load_lm
from darkmatter.store import ActivationStore

pytestmark = pytest.mark.slow


def test_embedded_model_hooks_and_harvest(tmp_path: Path) -> None:
    lm = load_lm("embedded", device="cpu")
    assert lm.identity["n_layers"] == 30 and lm.identity["d_model"] == 576
    src = json.loads((Path(lm.model.config._name_or_path) / "darkmatter_source.json").read_text())
    assert src["gguf_sha256"] == EMBEDDED_GGUF_SHA256
    ids = lm.tokenizer(
        "It is a truth universally acknowledged, that a single man", return_tensors="pt"
    ).input_ids
    sites = [f"blocks.15.{k}" for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]
    with torch.no_grad():
        hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        with capture(lm.model, sites) as cap:
            run(lm.model, input_ids=ids)
    assert torch.equal(cap.acts[sites[3]], hs[16])
    torch.testing.assert_close(sum(cap.acts[s] for s in sites[:3]), cap.acts[sites[3]], rtol=1e-5, atol=1e-3)

    out = tmp_path / "run"
    # the tiny preset records no loss in its own store; this checks the model's loss on Austen too (the
    # whole tiny study on the embedded model runs in tests/test_distributed.py)
    args = ["run", "--preset", "tiny", "--out", str(out), "--quiet", "--steps", "harvest"]
    assert main([*args, "--set", "harvest.with_loss=true"]) == 0
    assert not (out / "results" / "family.json").exists()  # the harvest alone
    store = ActivationStore.open(out / "store")
    assert store.info()["tokens"] == 16 * 64
    losses = torch.cat([b.loss for b in store.iter_batches(drop_last_position=True) if b.loss is not None])
    mean = float(losses.mean())
    assert 1.5 < mean < 6.0 and math.isfinite(mean)  # a real LM on English text, not noise (ln 49152 = 10.8)
    norms = torch.cat([b.acts["blocks.15.hook_resid_post"].norm(dim=-1) for b in store.iter_batches()])
    assert float(norms.median()) > 10.0
