"""Activation store: round trip, checksums, identity protection, and resume after SIGKILL."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from darkmatter.errors import StoreError
from darkmatter.harvest import HarvestConfig, harvest
from darkmatter.lm.hooks import capture, run
from darkmatter.lm.loading import LoadedLM
from darkmatter.store import ActivationStore
from darkmatter.text import TextConfig, make_contexts

from conftest import tiny_model, tiny_tokenizer

SITES = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]


def _lm() -> LoadedLM:
    tok = tiny_tokenizer()
    ident = {
        "name": "tiny-llama",
        "model_type": "llama",
        "n_layers": 3,
        "d_model": 64,
        "vocab_size": 74,
        "config_sha": "x",
        "dtype": "float32",
    }
    return LoadedLM(model=tiny_model("llama"), tokenizer=tok, identity=ident, bos_token_id=tok.bos_token_id)


def _setup(corpus: Path, n: int = 10, **harvest_kw: object) -> tuple[LoadedLM, TextConfig, HarvestConfig]:
    text = TextConfig(source=str(corpus), ctx_len=32, n_contexts=n, skip_positions=3)
    cfg = HarvestConfig(sites=SITES, batch_size=2, shard_contexts=3, **harvest_kw)
    return _lm(), text, cfg


def test_round_trip_matches_direct_capture(tmp_path: Path, corpus_file: Path) -> None:
    lm, text, cfg = _setup(corpus_file)
    ctx = make_contexts(text, lm.tokenizer, lm.bos_token_id)
    store = harvest(lm, ctx, text, cfg, str(tmp_path / "s"))
    assert store.complete and store.n_shards == 4
    with torch.no_grad(), capture(lm.model, SITES) as cap:
        out = run(lm.model, input_ids=torch.as_tensor(ctx.tokens, dtype=torch.long))
    rows = list(ActivationStore.open(tmp_path / "s").iter_batches(batch_tokens=50))
    acts = {s: torch.cat([b.acts[s] for b in rows]) for s in SITES}
    ctx_ids = torch.cat([b.context for b in rows])
    pos = torch.cat([b.position for b in rows])
    assert len(ctx_ids) == 10 * (32 - 3) and int(pos.min()) == 3
    for s in SITES:
        torch.testing.assert_close(acts[s], cap.acts[s][ctx_ids, pos], rtol=1e-6, atol=1e-6)
    tok = torch.cat([b.token for b in rows])
    assert torch.equal(tok, torch.as_tensor(ctx.tokens, dtype=torch.long)[ctx_ids, pos])
    loss = torch.cat([b.loss for b in rows if b.loss is not None])
    nxt = torch.as_tensor(ctx.tokens, dtype=torch.long)[ctx_ids[:5], pos[:5] + 1]
    ref = torch.nn.functional.cross_entropy(out.logits[ctx_ids[:5], pos[:5]], nxt, reduction="none")
    torch.testing.assert_close(loss[:5], ref, rtol=1e-5, atol=1e-5)
    last = pos == 31
    assert torch.isnan(loss[last]).all() and torch.isfinite(loss[~last]).all()


def test_bf16_storage_and_subset(tmp_path: Path, corpus_file: Path) -> None:
    lm, text, cfg = _setup(corpus_file, dtype="bf16", with_loss=False)
    ctx = make_contexts(text, lm.tokenizer, lm.bos_token_id)
    store = harvest(lm, ctx, text, cfg, str(tmp_path / "s"))
    shard = store.load_shard(0)
    assert shard[SITES[0]].dtype == torch.bfloat16 and "loss" not in shard
    rows = list(
        store.iter_batches([SITES[0]], contexts=np.array([1, 7]), skip_positions=0, drop_last_position=True)
    )
    assert set(torch.cat([b.context for b in rows]).tolist()) == {1, 7}
    assert sum(len(b) for b in rows) == 2 * 31 and rows[0].acts[SITES[0]].dtype == torch.float32


def test_corrupt_shard_is_detected(tmp_path: Path, corpus_file: Path) -> None:
    lm, text, cfg = _setup(corpus_file)
    ctx = make_contexts(text, lm.tokenizer, lm.bos_token_id)
    harvest(lm, ctx, text, cfg, str(tmp_path / "s"))
    shard = tmp_path / "s" / "shards" / "00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="fails its checksum"):
        list(ActivationStore.open(tmp_path / "s").iter_batches())
    # rerunning the harvest does not silently accept the corrupt shard either
    shard.unlink()
    with pytest.raises(StoreError, match="missing"):
        list(ActivationStore.open(tmp_path / "s").iter_batches())


def test_different_identity_never_touches_existing_store(tmp_path: Path, corpus_file: Path) -> None:
    lm, text, cfg = _setup(corpus_file)
    ctx = make_contexts(text, lm.tokenizer, lm.bos_token_id)
    harvest(lm, ctx, text, cfg, str(tmp_path / "s"))
    before = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    other = cfg.model_copy(update={"sites": ["blocks.2.hook_resid_post"]})
    with pytest.raises(StoreError, match="different configuration"):
        harvest(lm, ctx, text, other, str(tmp_path / "s"))
    after = {p: p.read_bytes() for p in (tmp_path / "s").rglob("*") if p.is_file()}
    assert before == after
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        harvest(lm, ctx, text, cfg, str(tmp_path / "junk"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{oops")
    with pytest.raises(StoreError, match="corrupt"):
        ActivationStore.open(tmp_path / "bad")
    with pytest.raises(StoreError, match="not an activation store"):
        ActivationStore.open(tmp_path / "nowhere")


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import darkmatter.atomic as st
    from test_store import _setup
    from darkmatter.harvest import harvest
    from darkmatter.text import make_contexts

    mode, kill_at = sys.argv[1], int(sys.argv[2])
    original = st.write_bytes
    calls = [0]

    def patched(path, data):
        calls[0] += 1
        if calls[0] == kill_at:
            if mode == "partial":  # die in the middle of writing a file
                (path.parent / (".%s.x.tmp" % path.name)).write_bytes(data[: len(data) // 2])
            else:  # die right after the file is complete, before anything else is recorded
                original(path, data)
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, data)

    st.write_bytes = patched
    lm, text, cfg = _setup(Path({corpus!r}))
    ctx = make_contexts(text, lm.tokenizer, lm.bos_token_id)
    harvest(lm, ctx, text, cfg, {out!r})
    """
)


@pytest.mark.parametrize(("mode", "kill_at"), [("partial", 4), ("after", 4), ("after", 5), ("partial", 7)])
def test_resume_after_sigkill_gives_identical_store(
    tmp_path: Path, corpus_file: Path, mode: str, kill_at: int
) -> None:
    lm, text, cfg = _setup(corpus_file)
    ctx = make_contexts(text, lm.tokenizer, lm.bos_token_id)
    ref = harvest(lm, ctx, text, cfg, str(tmp_path / "ref"))
    out = tmp_path / "killed"
    script = KILLER.format(tests=str(Path(__file__).parent), corpus=str(corpus_file), out=str(out))
    proc = subprocess.run(
        [sys.executable, "-c", script, mode, str(kill_at)], capture_output=True, timeout=300
    )
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    partial = ActivationStore.open(out)
    assert not partial.complete
    with pytest.raises(StoreError, match="incomplete"):
        list(partial.iter_batches())
    resumed = harvest(lm, ctx, text, cfg, str(out))
    assert resumed.complete
    assert [s["sha256"] for s in resumed.manifest["shards"]] == [s["sha256"] for s in ref.manifest["shards"]]
    files = sorted(p.name for p in (out / "shards").iterdir())
    assert files == [f"{i:05d}.safetensors" for i in range(4)]  # no stray temporary files
    assert not list(out.glob(".*.tmp"))
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


def test_verify_names_every_bad_shard_and_info_warns(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from darkmatter.cli import main

    lm, text, cfg = _setup(corpus_file)
    ctx = make_contexts(text, lm.tokenizer, lm.bos_token_id)
    harvest(lm, ctx, text, cfg, str(tmp_path / "s"))
    assert ActivationStore.open(tmp_path / "s").verify() == []
    assert main(["store", "verify", str(tmp_path / "s")]) == 0
    assert "every checksum matches" in capsys.readouterr().out
    corrupt = tmp_path / "s" / "shards" / "00001.safetensors"
    data = bytearray(corrupt.read_bytes())
    data[-10] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    (tmp_path / "s" / "shards" / "00003.safetensors").unlink()
    assert main(["store", "verify", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "shards/00001.safetensors: fails its checksum" in err
    assert "shards/00003.safetensors: missing" in err
    assert "00000" not in err and "Traceback" not in err
    assert main(["store", "info", str(tmp_path / "s"), "--json"]) == 0
    captured = capsys.readouterr()
    info = json.loads(captured.out)
    assert info["warnings"] == ["missing shard file shards/00003.safetensors"]
    assert "warning: missing shard file" in captured.err and "store verify" in captured.err
