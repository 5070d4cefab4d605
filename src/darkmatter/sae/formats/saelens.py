"""SAELens folders (``cfg.json`` + ``sae_weights.safetensors``): v6 and pre-6 configs, and the v6 saver.

Loading: v6 configs nest ``metadata`` (``model_name``, ``hook_name``, ...) and name the ``architecture``
(``standard`` = ReLU, ``jumprelu``, ``topk``); pre-6 configs are flat (``hook_point``/``hook_name``,
``activation_fn_str`` + ``activation_fn_kwargs.k``, ``finetuning_scaling_factor``, a boolean or string
``normalize_activations``). Exact rewrites: ``rescale_acts_by_decoder_norm`` becomes a unit-norm decoder; the
legacy finetuning ``scaling_factor [d_sae]`` is folded into ``W_dec``; ``expected_average_only_in`` becomes
``input_scale`` (from ``activation_scaler.json`` or ``norm_scaling_factor``; SAELens keeps that factor outside
the folder, so without it loading fails with instructions). Gated SAEs and transcoders are refused.

Saving writes the v6 layout with the input scale folded in (SAELens has no in-folder scalar), BatchTopK as
JumpReLU with a per-latent threshold (as SAELens does), and our own fields under ``metadata.darkmatter`` so a
round trip restores the config exactly. SAELens 6.x reads a config as v6 only when
``metadata.sae_lens_version`` is at least 6.0; without it, it rebuilds ``metadata`` from top-level keys and
loses ``hook_name`` and ``model_name``. So every save states a v6 version (the source's own when it has one).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from darkmatter import __version__
from darkmatter.errors import SAEFormatError
from darkmatter.sae.formats._common import (
    SAELENS_CFG,
    SAELENS_SCALER,
    SAELENS_SPARSITY,
    SAELENS_WEIGHTS,
    Converted,
    SAEFormat,
    as_flag,
    as_int,
    as_mapping,
    as_name,
    atomic_write_json,
    atomic_write_safetensors,
    canonical_hook_site,
    read_json,
    read_safetensors,
    require,
    scalar,
    site_metadata,
    storage_dtype,
    take,
    unit_decoder_norm,
    unsupported,
    wide,
)
from darkmatter.sae.model import SAE, SAEConfig, dtype_name

SAELENS_FORMAT_VERSION = "6.0.0"
"""The ``metadata.sae_lens_version`` our saves declare when the SAE carries no v6 version of its own."""
_ACTIVATIONS = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
_NOTED_NAME = re.compile(r"^(\S+) \(.+\)$")
_SAVE_ARCHITECTURE = {"relu": "standard", "jumprelu": "jumprelu", "batchtopk": "jumprelu", "topk": "topk"}
_NORMALIZE = {"none": "none", "layer_norm": "layer_norm", "constant_norm_rescale": "constant_norm_rescale"}
# Metadata keys that describe the loaded folder itself; not carried into a new save.
_LOAD_ONLY = (
    "saelens",
    "saelens_config_version",
    "converted_from",
    "has_sparsity_file",
    "reshape_activations",
)
_LEGACY_KEPT = (
    "hook_head_index",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "neuronpedia_id",
    "model_from_pretrained_kwargs",
    "sae_lens_version",
    "sae_lens_training_version",
    "exclude_special_tokens",
)


@dataclass
class _Spec:
    """The parts of a v6 or pre-6 config that change the computation."""

    architecture: str
    d_in: int
    d_sae: int
    k: int | None
    rescale_by_decoder_norm: bool
    apply_b_dec_to_input: bool
    normalize_activations: str
    hook_name: str | None
    model_name: str | None
    finetuning_scaling: bool
    version: str
    kept: dict[str, Any] = field(default_factory=dict)


def detect(path: Path) -> bool:
    """A folder with ``cfg.json`` and ``sae_weights.safetensors``."""
    return path.is_dir() and (path / SAELENS_CFG).is_file() and (path / SAELENS_WEIGHTS).is_file()


def _normalize_name(value: Any) -> str:
    if value is None or value is False:
        return "none"
    if value is True:  # pre-6 boolean: scale to the expected average norm
        return "expected_average_only_in"
    return str(value)


def _v6_spec(cfg: dict[str, Any], src: Path) -> _Spec:
    meta = cfg["metadata"]
    return _Spec(
        architecture=str(require(cfg, "architecture", src)),
        d_in=as_int(require(cfg, "d_in", src), "d_in", src),
        d_sae=as_int(require(cfg, "d_sae", src), "d_sae", src),
        k=as_int(cfg["k"], "k", src) if cfg.get("k") is not None else None,
        rescale_by_decoder_norm=as_flag(
            cfg.get("rescale_acts_by_decoder_norm"), "rescale_acts_by_decoder_norm", src, False
        ),
        apply_b_dec_to_input=as_flag(cfg.get("apply_b_dec_to_input"), "apply_b_dec_to_input", src, True),
        normalize_activations=_normalize_name(cfg.get("normalize_activations")),
        hook_name=as_name(meta.get("hook_name"), "metadata.hook_name", src),
        model_name=as_name(meta.get("model_name"), "metadata.model_name", src),
        finetuning_scaling=False,
        version="v6",
        kept={k: v for k, v in meta.items() if k not in ("hook_name", "model_name", "darkmatter")},
    )


def _legacy_spec(cfg: dict[str, Any], src: Path) -> _Spec:
    architecture = str(cfg.get("architecture") or "standard")
    act_fn = str(cfg.get("activation_fn_str") or "relu")
    kwargs = as_mapping(cfg.get("activation_fn_kwargs"), "activation_fn_kwargs", src)
    if architecture == "standard" and act_fn == "topk":
        architecture = "topk"
    elif architecture == "standard" and act_fn != "relu":
        raise unsupported(src, f"activation_fn_str {act_fn!r}", "Only relu and topk are.")
    return _Spec(
        architecture=architecture,
        d_in=as_int(require(cfg, "d_in", src), "d_in", src),
        d_sae=as_int(require(cfg, "d_sae", src), "d_sae", src),
        k=as_int(kwargs["k"], "activation_fn_kwargs.k", src)
        if architecture == "topk" and "k" in kwargs
        else None,
        rescale_by_decoder_norm=False,
        apply_b_dec_to_input=as_flag(cfg.get("apply_b_dec_to_input"), "apply_b_dec_to_input", src, True),
        normalize_activations=_normalize_name(cfg.get("normalize_activations")),
        hook_name=as_name(cfg.get("hook_name") or cfg.get("hook_point"), "hook_name", src),
        model_name=as_name(cfg.get("model_name"), "model_name", src),
        finetuning_scaling=as_flag(
            cfg.get("finetuning_scaling_factor"), "finetuning_scaling_factor", src, False
        ),
        version="pre-6",
        kept={k: cfg[k] for k in _LEGACY_KEPT if k in cfg},
    )


def _input_transform(spec: _Spec, folder: Path, cfg: dict[str, Any]) -> tuple[str, float]:
    """``(normalize, input_scale)`` for the config's ``normalize_activations``."""
    mode = spec.normalize_activations
    if mode in _NORMALIZE:
        return _NORMALIZE[mode], 1.0
    if mode != "expected_average_only_in":
        raise unsupported(folder / SAELENS_CFG, f"normalize_activations={mode!r}")
    if cfg.get("norm_scaling_factor") is not None:
        return "none", scalar(cfg["norm_scaling_factor"], "norm_scaling_factor", folder / SAELENS_CFG)
    if (folder / SAELENS_SCALER).is_file():
        scaler = read_json(folder / SAELENS_SCALER)
        return "none", scalar(
            require(scaler, "scaling_factor", folder / SAELENS_SCALER), "scaling_factor", folder
        )
    raise SAEFormatError(
        f"{folder / SAELENS_CFG}: normalize_activations='expected_average_only_in' scales inputs by a factor "
        f"that SAELens keeps outside the folder (pretrained_saes.yaml), and none was found here. Add "
        f'{SAELENS_SCALER} with {{"scaling_factor": <factor>}} (inputs are multiplied by it), or set '
        f'"norm_scaling_factor" in cfg.json.'
    )


def _activation(spec: _Spec, src: Path) -> str:
    if spec.architecture in _ACTIVATIONS:
        return _ACTIVATIONS[spec.architecture]
    if spec.architecture in ("batchtopk", "matryoshka_batchtopk"):
        raise unsupported(
            src, f"a {spec.architecture} training checkpoint", "SAELens saves the inference SAE as jumprelu."
        )
    if spec.architecture == "gated":
        raise unsupported(
            src, "a gated SAE (separate gate and magnitude encoders)", "Convert it to JumpReLU."
        )
    raise unsupported(src, f"architecture {spec.architecture!r}")


def _tensors(spec: _Spec, activation: str, raw: dict[str, Tensor], src: Path) -> dict[str, Tensor]:
    """Canonical tensors, each checked against the config's ``d_in``/``d_sae`` before any rewrite."""
    d, n = spec.d_in, spec.d_sae
    shapes = {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}
    tensors = {name: take(raw, name, shape, src) for name, shape in shapes.items()}
    if activation == "jumprelu":
        if "threshold" in raw or "log_threshold" not in raw:
            tensors["threshold"] = take(raw, "threshold", (n,), src)
        else:
            tensors["threshold"] = wide(take(raw, "log_threshold", (n,), src)).exp()
    if spec.finetuning_scaling:
        # decode(f) = (f * s) @ W_dec + b_dec = f @ (s[:, None] * W_dec) + b_dec
        tensors["W_dec"] = wide(tensors["W_dec"]) * wide(take(raw, "scaling_factor", (n,), src))[:, None]
    if spec.rescale_by_decoder_norm:
        tensors = unit_decoder_norm(tensors, scale_threshold=False)
    return tensors


def load(path: Path) -> Converted:
    """Convert a SAELens folder into canonical tensors and config."""
    cfg = read_json(path / SAELENS_CFG)
    raw = read_safetensors(path / SAELENS_WEIGHTS)
    src = path / SAELENS_CFG
    is_v6 = isinstance(cfg.get("metadata"), dict)
    spec = _v6_spec(cfg, src) if is_v6 else _legacy_spec(cfg, src)
    activation = _activation(spec, src)
    normalize, input_scale = _input_transform(spec, path, cfg)
    tensors = _tensors(spec, activation, raw, path / SAELENS_WEIGHTS)
    mine = cfg["metadata"].get("darkmatter") if is_v6 else None
    metadata, k = _metadata(spec, cfg, path, mine)
    model_name = spec.model_name
    if isinstance(mine, dict) and mine.get("model_name") is not None:
        model_name = as_name(mine["model_name"], "metadata.darkmatter.model_name", src)
    if isinstance(mine, dict) and mine.get("activation") == "batchtopk" and activation == "jumprelu":
        activation = "batchtopk"  # saved by us from a BatchTopK SAE: same tensors, same function
    site = canonical_hook_site(spec.hook_name)
    sae_cfg = SAEConfig(
        d_in=spec.d_in,
        d_sae=spec.d_sae,
        activation=activation,
        k=k if activation in ("topk", "batchtopk") else None,
        apply_b_dec_to_input=spec.apply_b_dec_to_input,
        input_scale=input_scale,
        normalize=normalize,
        hook_site=site,
        model_name=model_name,
        source_format="saelens",
        metadata={**site_metadata(spec.hook_name, site), **metadata},
    )
    return Converted(cfg=sae_cfg, tensors=tensors, dtype=storage_dtype(raw["W_enc"]))


def _metadata(spec: _Spec, cfg: dict[str, Any], path: Path, mine: Any) -> tuple[dict[str, Any], int | None]:
    """Our metadata (restored from a darkmatter save when present) and the k to use."""
    metadata: dict[str, Any] = {"saelens_config_version": spec.version}
    if spec.kept:
        metadata["saelens"] = spec.kept
    if cfg.get("reshape_activations", "none") != "none":
        metadata["reshape_activations"] = cfg["reshape_activations"]
    if (path / SAELENS_SPARSITY).is_file():
        metadata["has_sparsity_file"] = True
    k = spec.k
    if isinstance(mine, dict):
        metadata.update(as_mapping(mine.get("metadata"), "metadata.darkmatter.metadata", path / SAELENS_CFG))
        metadata["converted_from"] = mine.get("source_format")
        if k is None and isinstance(mine.get("k"), int):
            k = mine["k"]
    return metadata, k


def save(sae: SAE, path: Path) -> Path:
    """Write ``sae`` as a SAELens v6 folder (atomic per file); returns the folder."""
    if sae.cfg.input_scale != 1.0:
        sae = sae.fold_input_scale()
    try:
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_safetensors(path / SAELENS_WEIGHTS, dict(sae.named_tensors()))
        atomic_write_json(path / SAELENS_CFG, _v6_config(sae))
    except OSError as err:
        raise SAEFormatError(f"Cannot write the SAE to {path}: {err}") from err
    return path


def _v6_config(sae: SAE) -> dict[str, Any]:
    c = sae.cfg
    architecture = _SAVE_ARCHITECTURE[c.activation]
    own = {k: v for k, v in c.metadata.items() if k not in _LOAD_ONLY}
    reshape = c.metadata.get("reshape_activations") or (
        "hook_z" if (c.hook_site or "").endswith("attn.hook_z") else "none"
    )
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": dtype_name(sae.dtype),
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": c.normalize,
        "reshape_activations": reshape,
    }
    if architecture == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    kept = dict(c.metadata.get("saelens") or {})
    model_name = _plain_model_name(c.model_name)
    mine: dict[str, Any] = {
        "version": __version__,
        "source_format": c.metadata.get("converted_from") or c.source_format,
        "activation": c.activation,
        "k": c.k,
        "metadata": own,
    }
    if model_name != c.model_name:
        mine["model_name"] = c.model_name
    cfg["metadata"] = {
        **kept,
        "model_name": model_name,
        "hook_name": c.hook_site or c.metadata.get("source_hook_name"),
        "sae_lens_version": _v6_version(kept.get("sae_lens_version")),
        "darkmatter": mine,
    }
    return cfg


def _v6_version(version: Any) -> str:
    """``version`` when it names SAELens 6 or later, else the version our saves declare."""
    major = str(version or "").split(".", 1)[0]
    return str(version) if major.isdigit() and int(major) >= 6 else SAELENS_FORMAT_VERSION


def _plain_model_name(name: str | None) -> str | None:
    """The model id without a trailing note: ``org/model (Q4_1 GGUF, ...)`` -> ``org/model``.

    SAELens hands ``metadata.model_name`` to the model loader, so it must be an id, not a description.
    """
    if name and (match := _NOTED_NAME.match(name)):
        return match.group(1)
    return name


FORMAT = SAEFormat(
    name="saelens",
    layout=f"{SAELENS_CFG} + {SAELENS_WEIGHTS} (SAELens v6 or pre-6)",
    detect=detect,
    load=load,
)

__all__ = ["FORMAT", "load", "save"]
