"""EleutherAI sparsify TopK SAEs: ``cfg.json`` (with ``d_in``) + ``sae.safetensors``, a folder per hookpoint.

Tensors: ``encoder.weight [num_latents, d_in]`` (``W_enc`` is its transpose), ``encoder.bias``, ``W_dec
[num_latents, d_in]`` (already canonical: no transpose; SAELens' loader gets this wrong), ``b_dec [d_in]``.
Encode: ``relu((x - b_dec) @ W_enc + b_enc)`` then keep the top ``k``. Shapes are checked against ``d_in`` and
``num_latents`` (or ``expansion_factor * d_in``). Transcoders, skip connections and ``groupmax`` are refused.
The folder name is the hookpoint: ``layers.N`` is ``blocks.N.hook_resid_post``.
"""

from __future__ import annotations

from pathlib import Path

from darkmatter.sae.formats._common import (
    SPARSIFY_CFG,
    SPARSIFY_WEIGHTS,
    Converted,
    SAEFormat,
    as_flag,
    as_int,
    canonical_hook_site,
    read_json,
    read_safetensors,
    require,
    scalar,
    site_metadata,
    storage_dtype,
    take,
    unsupported,
)
from darkmatter.sae.model import SAEConfig


def detect(path: Path) -> bool:
    """A folder with ``cfg.json`` and ``sae.safetensors``."""
    return path.is_dir() and (path / SPARSIFY_CFG).is_file() and (path / SPARSIFY_WEIGHTS).is_file()


def load(path: Path) -> Converted:
    """Convert one sparsify hookpoint folder."""
    src = path / SPARSIFY_CFG
    cfg = read_json(src)
    d_in = as_int(require(cfg, "d_in", src), "d_in", src)
    num_latents = cfg.get("num_latents") or 0
    if num_latents:
        d_sae = as_int(num_latents, "num_latents", src)
    else:
        factor = scalar(require(cfg, "expansion_factor", src), "expansion_factor", src)
        d_sae = as_int(d_in * factor, "expansion_factor * d_in", src)
    if as_flag(cfg.get("transcode"), "transcode", src, False) or as_flag(
        cfg.get("skip_connection"), "skip_connection", src, False
    ):
        raise unsupported(src, "a sparsify transcoder or skip connection")
    if cfg.get("activation", "topk") != "topk":
        raise unsupported(src, f"sparsify activation {cfg.get('activation')!r}", "Only topk is.")
    k = as_int(require(cfg, "k", src), "k", src)
    weights = path / SPARSIFY_WEIGHTS
    raw = read_safetensors(weights)
    if "W_skip" in raw:
        raise unsupported(weights, "a sparsify skip connection (W_skip)")
    tensors = {
        "W_enc": take(raw, "encoder.weight", (d_sae, d_in), weights).T,
        "b_enc": take(raw, "encoder.bias", (d_sae,), weights),
        "W_dec": take(raw, "W_dec", (d_sae, d_in), weights),
        "b_dec": take(raw, "b_dec", (d_in,), weights),
    }
    site = canonical_hook_site(path.name)
    metadata = {"hookpoint": path.name, **site_metadata(path.name, site)}
    if as_flag(cfg.get("multi_topk"), "multi_topk", src, False):
        metadata["multi_topk"] = True  # training-time loss only; inference keeps the top k
    sae_cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        activation="topk",
        k=k,
        apply_b_dec_to_input=True,
        hook_site=site,
        source_format="sparsify",
        metadata=metadata,
    )
    return Converted(cfg=sae_cfg, tensors=tensors, dtype=storage_dtype(raw["encoder.weight"]))


FORMAT = SAEFormat(
    name="sparsify",
    layout=f"{SPARSIFY_CFG} (with d_in) + {SPARSIFY_WEIGHTS} (EleutherAI sparsify; one folder per hookpoint)",
    detect=detect,
    load=load,
)
