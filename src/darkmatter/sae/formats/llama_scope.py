"""Llama Scope v1 (``hyperparams.json`` + ``checkpoints/final.safetensors``) and llamascopium v2
(``config.json`` + ``sae_weights.safetensors``/``.pt``), both from OpenMOSS ``lm_saes``.

lm_saes computes, with ``s_in = sqrt(d_model) / avg_norm[in]`` and ``s_out = sqrt(d_model) / avg_norm[out]``
(``norm_activation == "dataset-wise"``; the average norms are ``dataset_average_activation_norm``)::

    x_n   = x * s_in  (- b_dec  if use_decoder_bias and apply_decoder_bias_to_pre_encoder)
    pre   = x_n @ W_enc + b_enc
    score = pre * ||W_dec[i]||  if sparsity_include_decoder_norm  else pre
    codes = pre * gate(score)   (jumprelu: score > threshold; topk: k largest relu(score); relu: score > 0)
    x_hat = (codes @ W_dec + b_dec) / s_out

The canonical rewrite is exact in real arithmetic: ``sparsity_include_decoder_norm`` becomes a unit-norm
decoder (``W_enc[:, i] * n_i``, ``b_enc[i] * n_i``, ``W_dec[i] / n_i``; the threshold is unchanged because the
source already gates the norm-weighted score, and our codes are that score), ``input_scale = s_in``, and when
``s_out != s_in`` (the "out" norm is the average norm of the target site; an SAE has in == out) the decoder
is multiplied by ``s_in / s_out`` after folding any input ``b_dec`` subtraction into ``b_enc``. ``token-wise``
normalization is ``constant_norm_rescale``; ``inference`` means the norms are already folded in;
``batch-wise`` is batch-dependent and refused. Transcoders (``hook_point_out != hook_point_in``) are refused.

Note: SAELens' Llama Scope loader multiplies the threshold by ``s_in`` and leaves inputs unscaled; we follow
the lm_saes code above instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from darkmatter.errors import SAEFormatError
from darkmatter.sae.formats._common import (
    CONFIG_JSON,
    LLAMA_SCOPE_HYPERPARAMS,
    LLAMA_SCOPE_WEIGHTS,
    LLAMASCOPIUM_WEIGHTS,
    Converted,
    SAEFormat,
    as_flag,
    as_int,
    as_mapping,
    as_name,
    canonical_hook_site,
    filled,
    fold_b_dec_into_b_enc,
    read_json,
    read_safetensors,
    read_torch,
    require,
    scalar,
    site_metadata,
    storage_dtype,
    take,
    unit_decoder_norm,
    unsupported,
    wide,
)
from darkmatter.sae.model import SAEConfig

_NORM_PREFIX = "dataset_average_activation_norm."


@dataclass
class _Spec:
    """What an lm_saes config says about the computation."""

    d_model: int
    d_sae: int
    act_fn: str
    top_k: int | None
    norm_activation: str
    norm_in: float | None
    norm_out: float | None
    include_decoder_norm: bool
    use_decoder_bias: bool
    subtract_b_dec: bool
    hook_in: str | None
    source_format: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _sizes(cfg: dict[str, Any], src: Path) -> tuple[int, int]:
    d_model = as_int(require(cfg, "d_model", src), "d_model", src)
    if cfg.get("d_sae") is not None:
        return d_model, as_int(cfg["d_sae"], "d_sae", src)
    factor = scalar(require(cfg, "expansion_factor", src), "expansion_factor", src)
    return d_model, as_int(d_model * factor, "d_model * expansion_factor", src)


def _refuse_transcoder(cfg: dict[str, Any], src: Path) -> None:
    hook_in = as_name(cfg.get("hook_point_in"), "hook_point_in", src)
    hook_out = as_name(cfg.get("hook_point_out"), "hook_point_out", src)
    if hook_out is not None and hook_out != hook_in:
        raise unsupported(
            src, f"a transcoder ({hook_in} -> {hook_out})", "Only SAEs that reconstruct their input are."
        )


def _spec(cfg: dict[str, Any], src: Path, norms: Mapping[str, Any], source_format: str) -> _Spec:
    """What ``cfg`` says; call ``_refuse_transcoder`` first (it checks the hook names are strings)."""
    d_model, d_sae = _sizes(cfg, src)
    hook_in = cfg.get("hook_point_in")
    hook_out = cfg.get("hook_point_out") or hook_in
    norm_in = norms.get("in", norms.get(hook_in)) if hook_in is not None else norms.get("in")
    norm_out = norms.get("out", norms.get(hook_out)) if hook_out is not None else norms.get("out")
    use_bias = as_flag(cfg.get("use_decoder_bias"), "use_decoder_bias", src, True)
    return _Spec(
        d_model=d_model,
        d_sae=d_sae,
        act_fn=str(cfg.get("act_fn", "relu")).lower(),
        top_k=cfg.get("top_k"),
        norm_activation=str(cfg.get("norm_activation", "dataset-wise")),
        norm_in=scalar(norm_in, "average activation norm (in)", src) if norm_in is not None else None,
        norm_out=scalar(norm_out, "average activation norm (out)", src) if norm_out is not None else None,
        include_decoder_norm=as_flag(
            cfg.get("sparsity_include_decoder_norm"), "sparsity_include_decoder_norm", src, True
        ),
        use_decoder_bias=use_bias,
        subtract_b_dec=use_bias
        and as_flag(
            cfg.get("apply_decoder_bias_to_pre_encoder"), "apply_decoder_bias_to_pre_encoder", src, False
        ),
        hook_in=hook_in,
        source_format=source_format,
    )


def _scales(spec: _Spec, src: Path) -> tuple[str, float, float]:
    """``(normalize, s_in, s_out)``."""
    mode = spec.norm_activation
    if mode == "inference":
        return "none", 1.0, 1.0
    if mode == "token-wise":
        return "constant_norm_rescale", 1.0, 1.0
    if mode != "dataset-wise":
        raise unsupported(src, f"norm_activation={mode!r} (depends on the batch)")
    if spec.norm_in is None or spec.norm_out is None or spec.norm_in <= 0 or spec.norm_out <= 0:
        raise SAEFormatError(
            f"{src}: norm_activation is 'dataset-wise' but positive dataset_average_activation_norm "
            f"values for 'in' and 'out' were not found (got in={spec.norm_in}, out={spec.norm_out})."
        )
    root = math.sqrt(spec.d_model)
    return "none", root / spec.norm_in, root / spec.norm_out


def _activation(spec: _Spec, threshold: Tensor | None, src: Path) -> tuple[str, int | None]:
    if spec.act_fn == "jumprelu":
        if threshold is None:
            raise SAEFormatError(f"{src}: act_fn is jumprelu but no JumpReLU threshold was found.")
        return "jumprelu", None
    if spec.act_fn == "topk":
        return "topk", as_int(require({"top_k": spec.top_k}, "top_k", src), "top_k", src)
    if spec.act_fn == "relu":
        return "relu", None
    raise unsupported(src, f"act_fn={spec.act_fn!r}", "Use an SAE converted to jumprelu or topk.")


def _convert(spec: _Spec, tensors: dict[str, Tensor], threshold: Tensor | None, src: Path) -> Converted:
    """Apply the exact rewrite described in the module docstring."""
    dtype = storage_dtype(tensors["W_enc"])
    activation, k = _activation(spec, threshold, src)
    if activation == "jumprelu" and threshold is not None:
        tensors = {**tensors, "threshold": threshold}
    normalize, s_in, s_out = _scales(spec, src)
    subtract = spec.subtract_b_dec
    if s_out != s_in and subtract:
        tensors, subtract = fold_b_dec_into_b_enc(tensors), False
    if spec.include_decoder_norm:
        tensors = unit_decoder_norm(tensors, scale_threshold=False)
    if s_out != s_in:
        tensors = {
            **tensors,
            "W_dec": wide(tensors["W_dec"]) * (s_in / s_out),
            "b_dec": wide(tensors["b_dec"]) * (s_in / s_out),
        }
    site = canonical_hook_site(spec.hook_in)
    metadata = {**site_metadata(spec.hook_in, site), **spec.metadata}
    if spec.norm_activation == "dataset-wise":
        metadata["dataset_average_activation_norm"] = {"in": spec.norm_in, "out": spec.norm_out}
    cfg = SAEConfig(
        d_in=spec.d_model,
        d_sae=spec.d_sae,
        activation=activation,
        k=k,
        apply_b_dec_to_input=subtract,
        input_scale=s_in,
        normalize=normalize,
        hook_site=site,
        source_format=spec.source_format,
        metadata=metadata,
    )
    return Converted(cfg=cfg, tensors=tensors, dtype=dtype)


def _decoder_bias(raw: dict[str, Tensor], key: str, spec: _Spec, src: Path, like: Tensor) -> Tensor:
    if spec.use_decoder_bias:
        return take(raw, key, (spec.d_model,), src)
    return torch.zeros(spec.d_model, dtype=like.dtype)  # use_decoder_bias=False


# --------------------------------------------------------------------------- v1


def detect_v1(path: Path) -> bool:
    """A folder with ``hyperparams.json`` and ``checkpoints/final.safetensors``."""
    return (
        path.is_dir()
        and (path / LLAMA_SCOPE_HYPERPARAMS).is_file()
        and (path / LLAMA_SCOPE_WEIGHTS).is_file()
    )


def load_v1(path: Path) -> Converted:
    """Convert a Llama Scope v1 folder."""
    src = path / LLAMA_SCOPE_HYPERPARAMS
    hp = read_json(src)
    _refuse_transcoder(hp, src)
    norms = as_mapping(hp.get("dataset_average_activation_norm"), "dataset_average_activation_norm", src)
    spec = _spec(hp, src, norms, "llama_scope")
    weights = path / LLAMA_SCOPE_WEIGHTS
    raw = read_safetensors(weights)
    d, n = spec.d_model, spec.d_sae
    tensors = {
        "W_enc": take(raw, "encoder.weight", (n, d), weights).T,
        "b_enc": take(raw, "encoder.bias", (n,), weights),
        "W_dec": take(raw, "decoder.weight", (d, n), weights).T,
    }
    tensors["b_dec"] = _decoder_bias(raw, "decoder.bias", spec, weights, tensors["W_enc"])
    threshold = None
    if spec.act_fn == "jumprelu":
        value = scalar(require(hp, "jump_relu_threshold", src), "jump_relu_threshold", src)
        threshold = filled(n, value)
    return _convert(spec, tensors, threshold, src)


# --------------------------------------------------------------------------- v2 (llamascopium)


def _v2_weights(path: Path) -> Path | None:
    return next((path / name for name in LLAMASCOPIUM_WEIGHTS if (path / name).is_file()), None)


def detect_v2(path: Path) -> bool:
    """A folder with ``config.json`` and ``sae_weights.safetensors`` (or another lm_saes checkpoint name)."""
    return path.is_dir() and (path / CONFIG_JSON).is_file() and _v2_weights(path) is not None


def _v2_state(file: Path) -> dict[str, Tensor]:
    if file.suffix == ".safetensors":
        return read_safetensors(file)
    obj = read_torch(file)
    state = obj.get("sae", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        raise SAEFormatError(f"{file}: expected a state dict of named tensors (optionally under 'sae').")
    return state


def load_v2(path: Path) -> Converted:
    """Convert a llamascopium v2 folder."""
    src = path / CONFIG_JSON
    cfg = read_json(src)
    if cfg.get("sae_type", "sae") != "sae":
        raise unsupported(src, f"sae_type={cfg['sae_type']!r}", "Only plain SAEs (sae_type 'sae') are.")
    if cfg.get("use_glu_encoder"):
        raise unsupported(src, "a GLU encoder")
    _refuse_transcoder(cfg, src)
    weights = _v2_weights(path)
    if weights is None:
        raise SAEFormatError(f"{path}: no weights file; expected one of {list(LLAMASCOPIUM_WEIGHTS)}.")
    raw = _v2_state(weights)
    norms: Mapping[str, Any] = {
        k.removeprefix(_NORM_PREFIX): v for k, v in raw.items() if k.startswith(_NORM_PREFIX)
    }
    if not norms:
        norms = as_mapping(cfg.get("dataset_average_activation_norm"), "dataset_average_activation_norm", src)
    spec = _spec(cfg, src, norms, "llamascopium")
    d, n = spec.d_model, spec.d_sae
    tensors = {
        "W_enc": take(raw, "W_E", (d, n), weights),
        "b_enc": take(raw, "b_E", (n,), weights),
        "W_dec": take(raw, "W_D", (n, d), weights),
    }
    tensors["b_dec"] = _decoder_bias(raw, "b_D", spec, weights, tensors["W_enc"])
    threshold = None
    if spec.act_fn == "jumprelu":
        threshold = wide(take(raw, "activation_function.log_jumprelu_threshold", (n,), weights)).exp()
    return _convert(spec, tensors, threshold, src)


FORMAT_V1 = SAEFormat(
    name="llama_scope",
    layout=f"{LLAMA_SCOPE_HYPERPARAMS} + {LLAMA_SCOPE_WEIGHTS} (Llama Scope v1)",
    detect=detect_v1,
    load=load_v1,
)
FORMAT_V2 = SAEFormat(
    name="llamascopium",
    layout=f"{CONFIG_JSON} (with sae_type) + {LLAMASCOPIUM_WEIGHTS[0]} (llamascopium / lm_saes v2)",
    detect=detect_v2,
    load=load_v2,
)


def hub_path(site: str, layer: int, expansion: str) -> str:
    """A Llama Scope (Llama-3.1-8B base) SAE as ``repo:subfolder``: ``site`` ``res``, ``mlp`` or ``attn``;
    ``expansion`` ``8x`` (32k latents) or ``32x`` (128k)."""
    letter = {"res": "R", "mlp": "M", "attn": "A"}[site]
    repo = f"fnlp/Llama3_1-8B-Base-LX{letter}-{expansion}"
    return f"{repo}:Llama3_1-8B-Base-L{layer}{letter}-{expansion}"
