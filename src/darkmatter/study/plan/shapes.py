"""Sizes the planner needs without any weights: the model's architecture and every SAE's width.

The model's dimensions come from its config file (as ``preflight`` reads it; for a GGUF file, its metadata)
when that is on disk, else from ``KNOWN_MODELS`` (the presets' models), and the plan says so. An external
SAE's width comes from its config file or its ``params.npz`` header when the files are on disk, else from its
path (``width_16k`` ... ``width_1m`` in Gemma Scope paths, ``-8x``/``-32x`` expansion factors in Llama Scope
paths).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from darkmatter.errors import DarkMatterError
from darkmatter.sae.peek import npz_shape


@dataclass(frozen=True)
class ModelDims:
    """What the cost models need of a transformer (a gated MLP and grouped-query attention assumed)."""

    name: str
    n_layers: int
    d_model: int
    d_mlp: int
    vocab: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied_embeddings: bool = False
    source: str = "config"
    """'config' (the model's config file) or 'table' (``KNOWN_MODELS``: the config file is not on disk)."""

    def layer_params(self) -> int:
        """Weights of one decoder layer: q, k, v, o projections and the gated MLP's three matrices."""
        attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        return attn + 3 * self.d_model * self.d_mlp

    def params(self) -> int:
        """Every weight: layers, the embedding and (untied) the unembedding."""
        emb = self.vocab * self.d_model
        return self.n_layers * self.layer_params() + emb * (1 if self.tied_embeddings else 2)

    def layer_flops(self, ctx_len: int) -> float:
        """Forward FLOPs per token of one layer: its matmuls and causal attention over ``ctx_len``."""
        return 2.0 * self.layer_params() + 2.0 * ctx_len * self.n_heads * self.head_dim

    def head_flops(self) -> float:
        """Forward FLOPs per token of the unembedding."""
        return 2.0 * self.vocab * self.d_model


KNOWN_MODELS: dict[str, ModelDims] = {
    "google/gemma-2-2b": ModelDims("gemma-2-2b", 26, 2304, 9216, 256000, 8, 4, 256, True, "table"),
    "google/gemma-2-9b": ModelDims("gemma-2-9b", 42, 3584, 14336, 256000, 16, 8, 256, True, "table"),
    "google/gemma-3-1b-pt": ModelDims("gemma-3-1b-pt", 26, 1152, 6912, 262144, 4, 1, 256, True, "table"),
    "meta-llama/Llama-3.1-8B": ModelDims("llama-3.1-8b", 32, 4096, 14336, 128256, 32, 8, 128, False, "table"),
}


def _known(name: str) -> ModelDims | None:
    key = name.rstrip("/").lower()
    for k, dims in KNOWN_MODELS.items():
        if key == k.lower() or key.endswith("/" + k.split("/")[-1].lower()) or key == dims.name:
            return dims
    return None


def dims_from_config(config: dict[str, Any], name: str) -> ModelDims:
    """ModelDims of a model's ``config.json`` (a dict; a text model's config nested in ``text_config``)."""
    c = config.get("text_config") or config

    def get(*keys: str, default: int = 0) -> int:
        for k in keys:
            v = c.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return default

    d = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head", default=1)
    return ModelDims(
        name=name,
        n_layers=get("num_hidden_layers", "n_layer"),
        d_model=d,
        d_mlp=get("intermediate_size", "n_inner", default=4 * d),
        vocab=get("vocab_size"),
        n_heads=heads,
        n_kv_heads=get("num_key_value_heads", default=heads),
        head_dim=get("head_dim", default=d // heads),
        tied_embeddings=bool(c.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        source="config",
    )


def model_dims(name: str, *, online: bool = False, trust_remote_code: bool = False) -> ModelDims:
    """The model's dimensions from its local ``config.json``, else from ``KNOWN_MODELS``; no download and
    no import of transformers (reading the file is enough)."""
    from darkmatter.lm.gguf import looks_like_gguf
    from darkmatter.lm.loading import gguf_config_dict, model_source

    try:
        if looks_like_gguf(Path(name).expanduser()):  # read, not converted, to plan
            config = gguf_config_dict(Path(name).expanduser())
        else:
            path, _, _ = model_source(name, online=False)
            config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        dims = dims_from_config(config, name)
        if dims.n_layers and dims.d_model and dims.vocab:
            return dims
    except (DarkMatterError, OSError, ValueError):
        pass
    known = _known(name)
    if known is not None:
        return replace(known, name=name)
    if online:  # the config file alone (kilobytes), as preflight reads it
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        return dims_from_config(config.to_dict(), name)
    raise DarkMatterError(
        f"Cannot plan model {name!r}: its config file is not on disk and its architecture is not in the "
        f"planner's table ({', '.join(KNOWN_MODELS)}); point model.name at a local folder or pass --online."
    )


_WIDTH = re.compile(r"width_(\d+)([km])", re.IGNORECASE)
_EXPANSION = re.compile(r"-(\d+)x(?:$|[/:_-])", re.IGNORECASE)
_CONFIG_FILES = ("cfg.json", "hyperparams.json", "config.json")
_D_SAE_KEYS = ("d_sae", "dict_size", "num_latents", "n_latents", "d_hidden")


def width_from_path(path: str, d_model: int) -> int | None:
    """d_sae told by a path: ``width_16k`` = 2^14 ... ``width_1m`` = 2^20; ``-8x`` = 8 d_model."""
    m = _WIDTH.search(path)
    if m:
        value = int(m.group(1)) * (1000 if m.group(2).lower() == "k" else 1_000_000)
        return 1 << round(np.log2(value))
    m = _EXPANSION.search(path + "/")
    if m:
        return int(m.group(1)) * d_model
    return None


def _config_d_sae(folder: Path) -> int | None:
    for name in _CONFIG_FILES:
        try:
            cfg = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        for scope in (cfg, cfg.get("trainer") if isinstance(cfg, dict) else None):
            if not isinstance(scope, dict):
                continue
            for key in _D_SAE_KEYS:
                v = scope.get(key)
                if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                    return v
            d_in, factor = scope.get("d_in") or scope.get("d_model"), scope.get("expansion_factor")
            if isinstance(d_in, int) and isinstance(factor, int | float) and factor > 0:
                return int(d_in * factor)
    return None


def _npz_d_sae(path: Path) -> int | None:
    shape = npz_shape(path, "W_enc.npy")
    return shape[1] if shape is not None and len(shape) == 2 else None


def external_width(path: str, d_model: int, hookpoint: str | None = None) -> tuple[int, str]:
    """(d_sae, where it came from: 'files' or 'path') of an external SAE; the path's hint else 16 d_model."""
    folder = Path(path).expanduser()
    if hookpoint:
        folder = folder / hookpoint
    if folder.is_dir():
        found = _config_d_sae(folder) or (
            _npz_d_sae(folder / "params.npz") if (folder / "params.npz").is_file() else None
        )
        if found:
            return found, "files"
    hint = width_from_path(path, d_model)
    if hint:
        return hint, "path"
    return 16 * d_model, "guess"
