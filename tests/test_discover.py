"""Hook-site discovery: any decoder-only causal LM, overrides for the rest, a clear error otherwise."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from darkmatter.config import resolve_config
from darkmatter.errors import HookSiteError
from darkmatter.experiments.splice import record_layer_outputs, replay_prefix
from darkmatter.harvest import HarvestConfig, harvest
from darkmatter.lm import discover as disc
from darkmatter.lm.discover import arch_spec, discover, discover_from_config, register_override
from darkmatter.lm.hooks import capture, run, splice
from darkmatter.lm.loading import LoadedLM
from darkmatter.store import ActivationStore
from darkmatter.study.preflight import preflight
from darkmatter.text import TextConfig, make_contexts

from conftest import DISCOVERED_ARCHS, tiny_config, tiny_model, tiny_study_overrides, tiny_tokenizer

POST_NORMED = {"gemma2", "gemma3_text", "olmo2"}  # sub-block outputs pass a norm before the residual add


def _ids(seed: int = 0, length: int = 16) -> torch.Tensor:
    return torch.randint(2, 60, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", DISCOVERED_ARCHS)
def test_meta_skeleton_discovers_what_the_model_has(arch: str) -> None:
    spec = discover_from_config(tiny_config(arch))
    assert spec == discover(tiny_model(arch))
    assert spec.final_norm is not None and spec.embed is not None and spec.plain_residual
    if arch in POST_NORMED:
        assert (spec.attn, spec.mlp) == ("post_attention_layernorm", "post_feedforward_layernorm")
    else:
        assert "norm" not in spec.attn and "norm" not in spec.mlp


class _Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.mixer = torch.nn.Linear(d, d)
        self.ff = torch.nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(x)
        return x + self.ff(x)


class _Toy(torch.nn.Module):
    """A decoder-shaped model whose modules carry none of the usual names."""

    def __init__(self, d: int = 8, n: int = 3) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="toy", num_hidden_layers=n)
        self.emb = torch.nn.Embedding(64, d)
        self.stack = torch.nn.ModuleList(_Block(d) for _ in range(n))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids)
        for block in self.stack:
            x = block(x)
        return x


def test_undiscoverable_model_names_what_it_found_and_how_to_override(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(disc, "OVERRIDES", {})
    toy = _Toy()
    with pytest.raises(HookSiteError) as err:
        arch_spec(toy)
    msg = str(err.value)
    assert "'toy'" in msg and "stack (3 x _Block)" in msg and "ff, mixer" in msg
    assert "register_override('toy', layers='stack'" in msg

    register_override("toy", layers="stack", attn="mixer", mlp="ff")
    sites = [f"blocks.1.{k}" for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]
    with torch.no_grad(), capture(toy, sites) as cap:
        run(toy, input_ids=_ids())
    pre, attn, mlp, post = (cap.acts[s] for s in sites)
    torch.testing.assert_close(pre + attn + mlp, post)
    with pytest.raises(HookSiteError, match="Unknown override field"):
        register_override("toy", feedforward="ff")


def test_scaled_residual_refuses_component_sites() -> None:
    import transformers as tf

    config = tf.GraniteConfig(**{**tiny_config("llama").to_dict(), "residual_multiplier": 0.25})
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(HookSiteError, match="residual_multiplier"), capture(model, ["blocks.0.hook_mlp_out"]):
        pass
    with torch.no_grad(), capture(model, ["blocks.0.hook_resid_post"]) as cap:
        ref = model(input_ids=_ids(), output_hidden_states=True).hidden_states
    torch.testing.assert_close(cap.acts["blocks.0.hook_resid_post"], ref[1], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["olmo2", "mixtral", "gemma3_text"])
def test_splice_and_replay_are_exact_on_discovered_sites(arch: str) -> None:
    model = tiny_model(arch)
    ids = _ids(1, length=48)  # longer than the tiny Gemma 3's sliding window (32)
    with torch.no_grad():
        with record_layer_outputs(model, [0]) as rec:
            clean = model(input_ids=ids).logits
        with replay_prefix(model, 1, rec[0]), splice(model, "blocks.1.hook_mlp_out", lambda x: x, start=4):
            same = model(input_ids=ids).logits
        with splice(model, "blocks.1.hook_attn_out", torch.zeros_like, start=4):
            zeroed = model(input_ids=ids).logits
    assert torch.equal(clean, same)
    # an MoE block groups tokens per expert, so other positions' sums may change order (not value)
    torch.testing.assert_close(clean[:, :4], zeroed[:, :4], rtol=0, atol=0 if arch == "olmo2" else 1e-5)
    assert not torch.allclose(clean[:, 4:], zeroed[:, 4:])


@pytest.mark.parametrize("arch", ["qwen3", "olmo2"])
def test_harvest_of_a_model_outside_the_old_table(arch: str, tmp_path: Path, corpus_file: Path) -> None:
    tok = tiny_tokenizer()
    model = tiny_model(arch)
    identity = {
        "name": f"tiny-{arch}",
        "model_type": arch,
        "n_layers": 3,
        "d_model": 64,
        "vocab_size": len(tok),
        "config_sha": arch,
        "dtype": "float32",
    }
    lm = LoadedLM(model=model, tokenizer=tok, identity=identity, bos_token_id=tok.bos_token_id)
    sites = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out", "blocks.0.hook_attn_out"]
    text = TextConfig(source=str(corpus_file), ctx_len=24, n_contexts=4, skip_positions=2)
    contexts = make_contexts(text, tok, lm.bos_token_id)
    store = harvest(
        lm, contexts, text, HarvestConfig(sites=sites, batch_size=2, shard_contexts=2), str(tmp_path / "s")
    )
    assert store.complete
    with torch.no_grad(), capture(model, sites) as cap:
        run(model, input_ids=torch.as_tensor(contexts.tokens, dtype=torch.long))
    rows = list(ActivationStore.open(tmp_path / "s").iter_batches(batch_tokens=40))
    ctx, pos = torch.cat([b.context for b in rows]), torch.cat([b.position for b in rows])
    for s in sites:
        got = torch.cat([b.acts[s] for b in rows])
        torch.testing.assert_close(got, cap.acts[s][ctx, pos], rtol=1e-6, atol=1e-6)


def test_preflight_accepts_a_discoverable_model_and_names_an_undiscoverable_one(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_config("olmo2").save_pretrained(tmp_path / "m")
    cfg = resolve_config("tiny", overrides=tiny_study_overrides(tmp_path / "m", corpus_file))
    shape = preflight(cfg)
    assert (shape.model_type, shape.n_layers, shape.d_model) == ("olmo2", 3, 64)

    monkeypatch.setattr(disc, "MLP_NAMES", ("ffn",))
    with pytest.raises(
        HookSiteError, match=r"Model '.*': Could not find the decoder layers.*register_override"
    ):
        preflight(cfg)


def test_a_skeleton_that_cannot_be_built_on_meta_defers_to_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers as tf

    def fail(*_a: object, **_k: object) -> None:
        raise RuntimeError("needs real tensors")

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_config", fail)
    assert discover_from_config(tiny_config("qwen3")) is None
    with pytest.raises(HookSiteError, match="not a causal LM"):
        monkeypatch.undo()
        discover_from_config(tf.T5Config(vocab_size=80, d_model=16, num_layers=1, num_heads=2))


def _xglm_dir(path: Path) -> Path:
    """A saved tiny XGLM: its MLP is two bare Linear layers (fc1, fc2), which discovery cannot find."""
    import transformers as tf

    from conftest import VOCAB

    config = tf.XGLMConfig(
        vocab_size=len(VOCAB),
        d_model=64,
        ffn_dim=128,
        num_layers=3,
        attention_heads=4,
        max_position_embeddings=256,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_hook_modules_from_the_config_read_a_model_discovery_cannot(
    tmp_path: Path, corpus_file: Path
) -> None:
    from darkmatter.lm.loading import load_lm

    assert tuple(disc.HookModules.model_fields) == disc.ARCH_FIELDS
    model_dir = _xglm_dir(tmp_path / "xglm")
    base = tiny_study_overrides(model_dir, corpus_file)
    with pytest.raises(HookSiteError, match=r"fc1, fc2.*--set model\.hook_modules\.layers=model\.layers"):
        preflight(resolve_config("tiny", overrides=base))
    with pytest.raises(HookSiteError, match=r"mlp='ffn2'.*layer 0 \(XGLMDecoderLayer\).*fc1, fc2"):
        preflight(
            resolve_config(
                "tiny",
                overrides=[*base, "model.hook_modules.layers=model.layers", "model.hook_modules.mlp=ffn2"],
            )
        )

    with pytest.raises(
        HookSiteError, match=r"layers='model\.blocks': no such module.*embed_tokens, layer_norm, layers"
    ):
        preflight(resolve_config("tiny", overrides=[*base, "model.hook_modules.layers=model.blocks"]))

    cfg = resolve_config("tiny", overrides=[*base, "model.hook_modules.mlp=fc2"])
    assert preflight(cfg).n_layers == 3
    assert cfg.section("model")["hook_modules"]["mlp"] == "fc2"
    assert "hook_modules" not in resolve_config("tiny", overrides=base).section("model")  # old hashes stay

    lm = load_lm(str(model_dir), device="cpu", hook_modules=cfg.model.hook_modules.given())
    assert lm.identity["hook_modules"] == {"mlp": "fc2"}
    assert arch_spec(lm.model).mlp == "fc2" and arch_spec(lm.model).attn == "self_attn"
    sites = [f"blocks.1.{k}" for k in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post")]
    with torch.no_grad(), capture(lm.model, sites) as cap:
        hidden = lm.model(input_ids=_ids(), output_hidden_states=True).hidden_states
    pre, attn, mlp, post = (cap.acts[s] for s in sites)
    torch.testing.assert_close(pre + attn + mlp, post)
    torch.testing.assert_close(post, hidden[2], rtol=0, atol=0)
