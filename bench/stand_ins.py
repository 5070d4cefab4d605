"""Paper-dimension stand-ins: randomly initialised models with the published dimensions of Gemma 2 2B,
Gemma 2 9B and Llama 3.1 8B, and random SAEs of the real widths in the real folder layouts.

Nothing is downloaded. The dimensions are copied from each model's published ``config.json``; a model is
built once with transformers' config classes, saved as a local Hugging Face folder (safetensors, bf16 to
halve the disk) with the embedded model's tokenizer (its token ids stay below every vocabulary here), and
reused on later runs.

SAEs are written in chunks, so a 1m-latent SAE at d = 2304 (19 GB in float32) never sits in memory:
- Gemma Scope v1 (``params.npz``: ``W_enc [d, W]``, ``W_dec [W, d]``, ``b_enc``, ``b_dec``, per-latent
  JumpReLU ``threshold``), written as a zip of ``.npy`` members whose rows are streamed;
- Llama Scope v1 (``hyperparams.json`` + ``checkpoints/final.safetensors``): TopK (k = 50, as Llama Scope
  was trained) for the Llama stand-in, or JumpReLU with the scalar ``jump_relu_threshold`` for the full
  Gemma grid, whose L0 variants of one width share one hard-linked weights file (40 independent
  SAEs of 16k-1m latents would take 228 GB of disk at d = 2304; shared per width, 38 GB).

Realistic L0: pre-activations ``x @ W_enc`` on a sample of the stand-in model's own activations at the
SAE's site give each latent's mean and standard deviation; the pooled standardised pre-activations of up
to 65,536 latents give the quantile ``q`` exceeded by a fraction L0/W of them; latent j's threshold is
``mean_j + q * std_j``, so the mean L0 on that sample is the nominal L0.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHUNK_FLOATS = 32 * 1024 * 1024  # 128 MB of float32 per written chunk
POOLED_LATENTS = 65_536

_GEMMA2_COMMON: dict[str, Any] = {
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}


@dataclass(frozen=True)
class StandIn:
    """A model's architecture and dimensions, and the preset whose study runs on it."""

    arch: str  # gemma2 or llama
    preset: str
    config: dict[str, Any]
    sae_layout: str  # gemma_scope or llama_scope
    default_widths: tuple[str, ...]
    default_width_scale: float = 1.0
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, StandIn] = {
    # Gemma 2 2B: the published config.json of the base model.
    "gemma-2-2b": StandIn(
        arch="gemma2",
        preset="paper-gemma-2-2b",
        config={
            "hidden_size": 2304,
            "num_hidden_layers": 26,
            "intermediate_size": 9216,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "head_dim": 256,
            "vocab_size": 256000,
            "query_pre_attn_scalar": 256,
            **_GEMMA2_COMMON,
        },
        sae_layout="gemma_scope",
        default_widths=("16k", "32k", "65k", "131k"),
    ),
    # Gemma 2 9B: the published config.json of the base model.
    "gemma-2-9b": StandIn(
        arch="gemma2",
        preset="paper-gemma-2-9b",
        config={
            "hidden_size": 3584,
            "num_hidden_layers": 42,
            "intermediate_size": 14336,
            "num_attention_heads": 16,
            "num_key_value_heads": 8,
            "head_dim": 256,
            "vocab_size": 256000,
            "query_pre_attn_scalar": 256,
            **_GEMMA2_COMMON,
        },
        sae_layout="gemma_scope",
        default_widths=("16k", "32k", "65k", "131k"),
    ),
    # Llama 3.1 8B: the published config.json of the base model.
    "llama-3.1-8b": StandIn(
        arch="llama",
        preset="llama-scope-8b",
        config={
            "hidden_size": 4096,
            "num_hidden_layers": 32,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "vocab_size": 128256,
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
        },
        sae_layout="llama_scope",
        default_widths=("32k", "128k"),
        notes="Llama Scope layout, TopK k = 50",
    ),
    # A downsized Gemma 2 (the same code path, seconds on a CPU) for tests: 14 layers so that the 2B
    # preset's layer 12 exists; the vocabulary just covers the embedded tokenizer's ids.
    "tiny-gemma-2": StandIn(
        arch="gemma2",
        preset="paper-gemma-2-2b",
        config={
            "hidden_size": 64,
            "num_hidden_layers": 14,
            "intermediate_size": 256,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 32,
            "vocab_size": 49152,
            "query_pre_attn_scalar": 32,
            **_GEMMA2_COMMON,
        },
        sae_layout="gemma_scope",
        default_widths=("16k", "32k"),
        default_width_scale=1 / 64,
    ),
}

# Gemma Scope residual SAEs of Gemma 2 2B at layer 12: width -> published L0s (the L0 closest to 60,
# the one the preset's width sweep uses, first).
GRID_2B: dict[str, tuple[int, ...]] = {
    "16k": (41, 22, 82, 176, 445),
    "32k": (76, 12, 22, 40, 155, 360),
    "65k": (72, 21, 38, 141, 297),
    "131k": (67, 12, 20, 36, 129, 264),
    "262k": (67, 11, 21, 36, 121, 243),
    "524k": (65, 22, 29, 46, 115, 227),
    "1m": (58, 19, 26, 73, 107, 207),
}
LLAMA_TOPK = 50


def width_of(label: str) -> int:
    """``16k`` -> 16384, ``1m`` -> 1048576 (powers of two named in round thousands), ``128k`` -> 131072."""
    number, unit = int(label[:-1]), label[-1]
    return 2 ** round(math.log2(number * (1_000 if unit == "k" else 1_000_000)))


def scaled_width(label: str, scale: float) -> int:
    return max(8, round(width_of(label) * scale))


# --------------------------------------------------------------------------- models


def _config(spec: StandIn) -> Any:
    from transformers import Gemma2Config, LlamaConfig

    cls = Gemma2Config if spec.arch == "gemma2" else LlamaConfig
    return cls(**spec.config, torch_dtype="bfloat16")


def parameter_count(spec: StandIn) -> int:
    """Parameters of the stand-in (tied embeddings counted once)."""
    c = spec.config
    d, inter, layers, vocab = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_hidden_layers"],
        c["vocab_size"],
    )
    hd, heads, kv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    attn = d * heads * hd * 2 + d * kv * hd * 2
    norms = (4 if spec.arch == "gemma2" else 2) * d
    embed = vocab * d * (1 if c["tie_word_embeddings"] else 2)
    return layers * (attn + 3 * d * inter + norms) + embed + d


def forward_flops_per_token(spec: StandIn, ctx_len: int) -> float:
    """Matmul FLOPs of one token's forward pass: projections, MLP, attention over half the context on
    average (causal), and the unembedding."""
    c = spec.config
    d, inter, layers, vocab = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_hidden_layers"],
        c["vocab_size"],
    )
    hd, heads, kv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    proj = 2 * d * (2 * heads * hd + 2 * kv * hd)
    mlp = 2 * 3 * d * inter
    window = min(ctx_len, c.get("sliding_window") or ctx_len)
    attention = 2 * 2 * heads * hd * (window / 2)
    return layers * (proj + mlp + attention) + 2 * d * vocab


def build_model(name: str, out: Path, log: Any = print) -> Path:
    """The stand-in's model folder under ``out/models/name``, built once (atomic) and reused."""
    from darkmatter.lm.loading import embedded_model_dir

    spec = MODELS[name]
    target = out / "models" / name
    if (target / "standin.json").is_file():
        return target
    from transformers import AutoModelForCausalLM

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = _config(spec)
    log(f"building {name}: {parameter_count(spec) / 1e9:.2f} B parameters, random init, bf16")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="2GB")
    del model
    source = embedded_model_dir()
    for f in source.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy2(f, tmp / f.name)
    (tmp / "standin.json").write_text(
        json.dumps({"stand_in": name, "dims_from": "published config.json", "tokenizer": str(source)})
    )
    shutil.rmtree(target, ignore_errors=True)
    tmp.replace(target)
    return target


@torch.no_grad()
def sample_activations(
    model_dir: Path, layer: int, text_overrides: dict[str, Any], n_tokens: int, skip: int, device: str
) -> torch.Tensor:
    """``n_tokens`` residual vectors after decoder layer ``layer`` (float32, on ``device``): the same number
    of random positions (past ``skip``) from each of the text's contexts. Spread over many contexts: the
    tokens of one context share much of their residual direction, and a mean taken from one or two
    contexts sets thresholds that the study's other contexts cross far more (or less) often."""
    from transformers import AutoModelForCausalLM

    from darkmatter.lm.loading import load_tokenizer
    from darkmatter.text import TextConfig, make_contexts

    tokenizer, bos = load_tokenizer(str(model_dir))
    text = TextConfig(**text_overrides)
    ctx = make_contexts(text, tokenizer, bos).tokens
    per = math.ceil(n_tokens / ctx.shape[0])
    dtype = torch.bfloat16 if device == "cpu" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    # hidden_states[-1] is taken after the final norm: keep one layer more than needed
    model.model.layers = model.model.layers[: layer + 2]
    g = torch.Generator().manual_seed(0)
    rows: list[torch.Tensor] = []
    for i in range(ctx.shape[0]):
        ids = torch.as_tensor(ctx[i : i + 1], dtype=torch.long, device=device)
        h = model.model(input_ids=ids, output_hidden_states=True).hidden_states[layer + 1][0].float()
        pos = skip + torch.randperm(h.shape[0] - skip, generator=g)[:per]
        rows.append(h[pos.to(device)])
    del model
    return torch.cat(rows)[:n_tokens].contiguous()


# --------------------------------------------------------------------------- streamed writers


def _chunks(total: int, per: int) -> list[tuple[int, int]]:
    return [(a, min(a + per, total)) for a in range(0, total, per)]


def _gen(seed: int, device: str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()


def pooled_quantile(z: torch.Tensor, fraction: float) -> float:
    """The value exceeded by ``fraction`` of the pooled standardised pre-activations ``z``."""
    m = max(1, round(z.numel() * fraction))
    return float(torch.topk(z.flatten(), m).values.min())


def _latent_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mu = y.mean(0)
    sd = y.std(0).clamp_min(1e-6)
    return mu, sd


def write_gemma_scope(
    folder: Path, xs: torch.Tensor, d_sae: int, l0: int, seed: int, device: str
) -> dict[str, float]:
    """``folder/params.npz`` in the Gemma Scope v1 layout with per-latent JumpReLU thresholds for ``l0``.

    ``W_enc`` is streamed by rows of d (accumulating the sample's pre-activations, ``[n, W]``), ``W_dec``
    by rows of latents (unit norm); the thresholds follow from the pre-activations.
    """
    d = xs.shape[1]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "params.npz.tmp"
    y = torch.zeros(xs.shape[0], d_sae, device=device)
    g = _gen(seed, device)
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("W_enc.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, _npy_header((d, d_sae)))
            for a, b in _chunks(d, max(1, CHUNK_FLOATS // d_sae)):
                rows = torch.randn(b - a, d_sae, generator=g, device=device) / math.sqrt(d)
                y.addmm_(xs[:, a:b], rows)
                f.write(_to_bytes(rows))
        with zf.open("W_dec.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, _npy_header((d_sae, d)))
            for a, b in _chunks(d_sae, max(1, CHUNK_FLOATS // d)):
                rows = torch.randn(b - a, d, generator=g, device=device)
                f.write(_to_bytes(rows / rows.norm(dim=1, keepdim=True)))
        mu, sd = _latent_stats(y)
        z = (y[:, :POOLED_LATENTS] - mu[:POOLED_LATENTS]) / sd[:POOLED_LATENTS]
        q = pooled_quantile(z, l0 / d_sae)
        threshold = mu + q * sd
        l0_sample = float((y > threshold).sum(1).float().mean())
        del y, z
        arrays = {
            "b_enc": torch.zeros(d_sae),
            "b_dec": xs.mean(0),
            "threshold": threshold,
        }
        for name, t in arrays.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, _npy_header(tuple(t.shape)))
                f.write(_to_bytes(t))
    tmp.replace(folder / "params.npz")
    return {"l0_sample": l0_sample, "quantile": q}


def _npy_header(shape: tuple[int, ...]) -> dict[str, Any]:
    return {"descr": "<f4", "fortran_order": False, "shape": shape}


class _SafetensorsWriter:
    """A float32 safetensors file written tensor by tensor, in chunks, in the order declared."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shapes.items():
            size = 4 * math.prod(shape)
            header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.file.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, t: torch.Tensor) -> None:
        self.file.write(_to_bytes(t))

    def close(self) -> None:
        self.file.close()


def write_llama_scope_weights(
    path: Path, xs: torch.Tensor, d_sae: int, seed: int, device: str, standardise: bool
) -> torch.Tensor:
    """``checkpoints/final.safetensors`` of the Llama Scope v1 layout: ``encoder.weight [W, d]`` streamed by
    latents, ``decoder.weight [d, W]`` by rows of d (columns of unit norm on average).

    ``standardise``: each latent's encoder row and bias make its pre-activation on the sample mean 0 and
    std 1 (so one scalar JumpReLU threshold sets the L0). Returns the pooled standardised pre-activations
    of up to 65,536 latents (empty when not standardising)."""
    d = xs.shape[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    shapes = {
        "encoder.weight": (d_sae, d),
        "encoder.bias": (d_sae,),
        "decoder.weight": (d, d_sae),
        "decoder.bias": (d,),
    }
    w = _SafetensorsWriter(tmp, shapes)
    g = _gen(seed, device)
    bias = torch.zeros(d_sae, device=device)
    pooled: list[torch.Tensor] = []
    for a, b in _chunks(d_sae, max(1, CHUNK_FLOATS // d)):
        rows = torch.randn(b - a, d, generator=g, device=device) / math.sqrt(d)
        if standardise:
            y = xs @ rows.T
            mu, sd = _latent_stats(y)
            rows = rows / sd[:, None]
            bias[a:b] = -mu / sd
            if a < POOLED_LATENTS:
                pooled.append(((y - mu) / sd)[:, : POOLED_LATENTS - a])
        w.write(rows)
    w.write(bias)
    for a, b in _chunks(d, max(1, CHUNK_FLOATS // d_sae)):
        w.write(torch.randn(b - a, d_sae, generator=g, device=device) / math.sqrt(d))
    w.write(xs.mean(0))
    w.close()
    tmp.replace(path)
    return torch.cat(pooled, dim=1) if pooled else torch.empty(0)


def llama_scope_hyperparams(d: int, d_sae: int, site: str, *, l0_threshold: float | None) -> dict[str, Any]:
    """``hyperparams.json``: TopK k = 50 when ``l0_threshold`` is None, else JumpReLU at that threshold."""
    hp: dict[str, Any] = {
        "d_model": d,
        "d_sae": d_sae,
        "hook_point_in": site,
        "hook_point_out": site,
        "norm_activation": "inference",
        "sparsity_include_decoder_norm": False,
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        "dataset_average_activation_norm": {"in": 1.0, "out": 1.0},
    }
    if l0_threshold is None:
        hp.update(act_fn="topk", top_k=LLAMA_TOPK)
    else:
        hp.update(act_fn="jumprelu", jump_relu_threshold=l0_threshold)
    return hp


def link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
