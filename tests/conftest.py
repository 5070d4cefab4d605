"""Shared fixtures: tiny random-init causal LMs of each supported architecture and a character tokenizer."""

from __future__ import annotations

import math
import string
from pathlib import Path
from typing import Any

import pytest
import torch

VOCAB = ["<bos>", "<unk>", *string.ascii_letters, *string.digits, *" .,;:'!?-\n"]


def tiny_tokenizer() -> Any:
    """A character-level fast tokenizer with a BOS token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")


def tiny_config(arch: str, n_layers: int = 3, d: int = 64) -> Any:
    import transformers as tf

    v = len(VOCAB)
    common = {
        "vocab_size": v,
        "hidden_size": d,
        "intermediate_size": 2 * d,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
    }
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=32)
    ids = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}  # inside the tiny vocabulary
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if arch == "gemma":
        return tf.GemmaConfig(**common, head_dim=16, **ids)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=32, **ids)
    if arch == "phi3":
        return tf.Phi3Config(**common, **ids)
    if arch == "olmo2":
        return tf.Olmo2Config(**common, **ids)
    if arch == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if arch == "starcoder2":
        return tf.Starcoder2Config(**common, **ids)
    if arch == "stablelm":
        return tf.StableLmConfig(**common, **ids)
    if arch == "phi":
        return tf.PhiConfig(**common, **ids)
    if arch == "stablelm_parallel":
        return tf.StableLmConfig(**common, use_parallel_residual=True, **ids)
    if arch == "gpt_neox_sequential":
        return _gpt_neox(v, d, n_layers, use_parallel_residual=False, **ids)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=v, n_embd=d, n_layer=n_layers, n_head=4, n_positions=256)
    if arch == "gpt_neox":
        return _gpt_neox(v, d, n_layers)
    raise ValueError(arch)


def _gpt_neox(v: int, d: int, n_layers: int, **extra: Any) -> Any:
    import transformers as tf

    return tf.GPTNeoXConfig(
        vocab_size=v,
        hidden_size=d,
        intermediate_size=2 * d,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        **extra,
    )


ARCHS = ["llama", "mistral", "qwen2", "gemma2", "gpt2", "gpt_neox"]
# Every family whose hook sites are checked (found by discovery; ARCHS is the quicker subset other tests use).
DISCOVERED_ARCHS = [
    *ARCHS,
    "qwen3",
    "gemma",
    "gemma3_text",
    "phi3",
    "olmo2",
    "mixtral",
    "starcoder2",
    "stablelm",
    "stablelm_parallel",
    "gpt_neox_sequential",
    "phi",
]


def tiny_model(arch: str, n_layers: int = 3, seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, n_layers))
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama + tokenizer folder, loadable with ``load_lm``."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


CORPUS_WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hex",
    "jovial",
    "bankers",
]


def write_corpus(path: Path) -> Path:
    """A plain text file long enough for a few dozen 32-character contexts (800 seeded random words)."""
    rng = torch.Generator().manual_seed(0)
    words = torch.randint(len(CORPUS_WORDS), (800,), generator=rng)
    path.write_text(" ".join(CORPUS_WORDS[int(i)] for i in words))
    return path


@pytest.fixture()
def corpus_file(tmp_path: Path) -> Path:
    """A plain text file long enough for a few dozen 32-character contexts."""
    return write_corpus(tmp_path / "corpus.txt")


def tiny_study_overrides(model_dir: Path, corpus: Path) -> list[str]:
    """CLI ``--set`` overrides for a seconds-long study on the tiny model."""
    return [
        f"model.name={model_dir}",
        "model.device=cpu",
        f"text.source={corpus}",
        "text.ctx_len=32",
        "text.n_contexts=12",
        "text.skip_positions=2",
        "layer=1",
        'harvest.sites=["blocks.0.hook_resid_post"]',
        "harvest.batch_size=2",
        "harvest.shard_contexts=4",
        "family.aux_sites=false",
        "family.widths=[16,32]",
        "family.k=4",
        "family.ks=[2]",
        "family.width_for_ks=32",
        "family.train.batch_size=64",
        "family.train.epochs=1",
        "layer_sweep.layers=[0,2]",
        "layer_sweep.d_sae=16",
        "layer_sweep.k=2",
        "layer_sweep.train.batch_size=64",
        "layer_sweep.train.epochs=1",
        "error_saes.train.batch_size=64",
        "error_saes.train.epochs=1",
        f"error_saes.interp.local_model={model_dir}",
        "error_saes.interp.n_latents=2",
        "error_saes.interp.min_activations=1",
        "error_saes.interp.window=8",
        "error_saes.interp.n_examples_explain=3",
        "error_saes.interp.n_per_decile=1",
        "error_saes.interp.n_negatives=2",
    ]


# -- comparing two runs' results ---------------------------------------------------------------------------
IGNORED_RESULT_KEYS = ("second", "provenance", "time", "elapsed", "n_cached")  # timings, cache bookkeeping


def strip_volatile(obj: Any) -> Any:
    """A result JSON without the keys that differ between identical runs (timings, provenance)."""
    if isinstance(obj, dict):
        return {k: strip_volatile(v) for k, v in obj.items() if not any(t in k for t in IGNORED_RESULT_KEYS)}
    if isinstance(obj, list):
        return [strip_volatile(v) for v in obj]
    return obj


def json_diffs(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two JSON values differ: keys, lengths, floats beyond rel 1e-6 (NaN equals NaN), other values."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in json_diffs(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} vs {len(b)}"]
        return [
            d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in json_diffs(x, y, f"{where}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) else [f"{where}: {a} vs {b}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]
