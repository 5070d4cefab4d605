"""saprmarks/dictionary_learning: ``ae.pt`` (a torch state dict) + optional ``config.json`` (with
``trainer.dict_class``).

Always unpickled with ``weights_only=True``. Classes (chosen by ``dict_class``, else by the tensor names):

- ``AutoEncoder`` (ReLU): ``bias`` is ``b_dec`` and is subtracted from the input; ``encoder.weight [F, d]``,
  ``encoder.bias``, ``decoder.weight [d, F]``. ``AutoEncoderNew``: ReLU, ``decoder.bias``, no subtraction.
- ``AutoEncoderTopK``: same layout with ``b_dec`` (older: ``bias``) and a ``k`` buffer; inference is TopK.
- ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE`` (``W_enc [d, F]`` layout): inference is
  ``relu(pre) * (relu(pre) > threshold)`` with the scalar ``threshold`` buffer, i.e. our batchtopk with that
  threshold on every latent. A threshold of -1 means training never set it; dictionary_learning would then
  keep every positive latent, which is not what a BatchTopK SAE means, so we use per-token TopK(k) instead and
  record ``metadata["threshold_unset"]``.
- ``JumpReluAutoEncoder``: canonical names, no ``b_dec`` subtraction; its codes are
  ``relu(pre) * (pre > threshold) * ||W_dec[i]||``, reproduced exactly by rescaling to a unit-norm decoder
  with the threshold scaled too.
- Gated SAEs are refused.

Without ``config.json`` a ``k`` buffer next to ``encoder.weight`` reads as ``AutoEncoderTopK``:
``BatchTopKSAE`` saves the same tensors, and only the config tells them apart.

An interrupted run leaves a backup dict ``{"step", "ae", "optimizer", "config", "norm_factor"}`` instead of a
state dict; we take ``ae`` and, since training divided inputs by ``norm_factor`` (biases are only rescaled at
the final save), set ``input_scale = 1 / norm_factor``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from darkmatter.errors import SAEFormatError
from darkmatter.sae.formats._common import (
    CONFIG_JSON,
    DICTIONARY_LEARNING_WEIGHTS,
    Converted,
    SAEFormat,
    as_int,
    as_mapping,
    as_name,
    filled,
    peek_torch_keys,
    read_json,
    read_torch,
    scalar,
    storage_dtype,
    take,
    unit_decoder_norm,
    unsupported,
)
from darkmatter.sae.model import SAEConfig

_COMPILED_PREFIX = "_orig_mod."
_BACKUP_KEYS = frozenset({"ae", "step"})
_SUBMODULE = re.compile(r"^(resid_post|mlp_out|attn_out)_layer_(\d+)$")
_SUBMODULE_SITE = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}


@dataclass
class _Parts:
    """One dictionary class converted to canonical form."""

    activation: str
    tensors: dict[str, Tensor]
    apply_b_dec_to_input: bool
    k: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def looks_like_state(keys: set[str]) -> bool:
    """Whether top-level checkpoint keys are a dictionary_learning state dict or backup dict."""
    keys = {k.removeprefix(_COMPILED_PREFIX) for k in keys}
    return keys >= _BACKUP_KEYS or "W_enc" in keys or ("encoder.weight" in keys and "pre_bias" not in keys)


def is_weights_file(path: Path) -> bool:
    """A ``.pt`` file saved by dictionary_learning (by name, sibling config, or tensor names)."""
    if not (path.is_file() and path.suffix == ".pt"):
        return False
    if path.name.startswith("ae"):
        return True
    if (path.parent / CONFIG_JSON).is_file():
        try:
            return "trainer" in read_json(path.parent / CONFIG_JSON)
        except SAEFormatError:
            return False
    keys = peek_torch_keys(path)
    return keys is not None and looks_like_state(keys)


def detect(path: Path) -> bool:
    """A folder with ``ae.pt``, or a dictionary_learning ``.pt`` file."""
    return (path.is_dir() and (path / DICTIONARY_LEARNING_WEIGHTS).is_file()) or is_weights_file(path)


# --------------------------------------------------------------------------- per-class converters


def _linear(state: Mapping[str, Tensor], bias_key: str, src: Path) -> dict[str, Tensor]:
    """``encoder``/``decoder`` Linear layout -> canonical tensors; ``b_dec`` from ``bias_key``."""
    enc = state.get("encoder.weight")
    if enc is None or enc.ndim != 2:
        raise SAEFormatError(f"{src}: expected a 2-D 'encoder.weight'; found keys {sorted(state)}.")
    n, d = (int(s) for s in enc.shape)
    return {
        "W_enc": take(state, "encoder.weight", (n, d), src).T,
        "b_enc": take(state, "encoder.bias", (n,), src),
        "W_dec": take(state, "decoder.weight", (d, n), src).T,
        "b_dec": take(state, bias_key, (d,), src),
    }


def _canonical(state: Mapping[str, Tensor], src: Path, *, threshold_vector: bool) -> dict[str, Tensor]:
    """``W_enc [d, F]`` layout (Matryoshka, JumpReLU) checked against ``W_enc``'s shape."""
    w_enc = state.get("W_enc")
    if w_enc is None or w_enc.ndim != 2:
        raise SAEFormatError(f"{src}: expected a 2-D 'W_enc'; found keys {sorted(state)}.")
    d, n = (int(s) for s in w_enc.shape)
    tensors = {
        "W_enc": take(state, "W_enc", (d, n), src),
        "b_enc": take(state, "b_enc", (n,), src),
        "W_dec": take(state, "W_dec", (n, d), src),
        "b_dec": take(state, "b_dec", (d,), src),
    }
    if threshold_vector:
        tensors["threshold"] = take(state, "threshold", (n,), src)
    return tensors


def _k(state: Mapping[str, Tensor], src: Path) -> int:
    if "k" not in state:
        raise SAEFormatError(f"{src}: a TopK dictionary needs the 'k' buffer; found keys {sorted(state)}.")
    k = scalar(state["k"], "k", src)
    if k <= 0 or k != int(k):
        raise SAEFormatError(f"{src}: k must be a positive integer, got {k}.")
    return int(k)


def _relu(state: Mapping[str, Tensor], src: Path) -> _Parts:
    return _Parts("relu", _linear(state, "bias", src), apply_b_dec_to_input=True)


def _relu_new(state: Mapping[str, Tensor], src: Path) -> _Parts:
    return _Parts("relu", _linear(state, "decoder.bias", src), apply_b_dec_to_input=False)


def _topk(state: Mapping[str, Tensor], src: Path) -> _Parts:
    bias_key = "b_dec" if "b_dec" in state else "bias"
    return _Parts("topk", _linear(state, bias_key, src), apply_b_dec_to_input=True, k=_k(state, src))


def _thresholded(tensors: dict[str, Tensor], state: Mapping[str, Tensor], src: Path) -> _Parts:
    """BatchTopK inference: the scalar threshold on every latent, or TopK(k) when it was never set."""
    k = _k(state, src)
    value = scalar(state.get("threshold", torch.tensor(-1.0)), "threshold", src)
    if value < 0:
        return _Parts("topk", tensors, apply_b_dec_to_input=True, k=k, metadata={"threshold_unset": True})
    n = tensors["b_enc"].shape[0]
    tensors = {**tensors, "threshold": filled(n, value)}
    return _Parts("batchtopk", tensors, apply_b_dec_to_input=True, k=k)


def _batch_topk(state: Mapping[str, Tensor], src: Path) -> _Parts:
    return _thresholded(_linear(state, "b_dec" if "b_dec" in state else "bias", src), state, src)


def _matryoshka(state: Mapping[str, Tensor], src: Path) -> _Parts:
    parts = _thresholded(_canonical(state, src, threshold_vector=False), state, src)
    if "group_sizes" in state:
        sizes = state["group_sizes"].reshape(-1)
        parts.metadata["group_sizes"] = [as_int(g, "group_sizes", src) for g in sizes.tolist()]
    return parts


def _jumprelu(state: Mapping[str, Tensor], src: Path) -> _Parts:
    tensors = unit_decoder_norm(_canonical(state, src, threshold_vector=True), scale_threshold=True)
    return _Parts("jumprelu", tensors, apply_b_dec_to_input=False)


_CONVERTERS: dict[str, Callable[[Mapping[str, Tensor], Path], _Parts]] = {
    "AutoEncoder": _relu,
    "AutoEncoderNew": _relu_new,
    "AutoEncoderTopK": _topk,
    "BatchTopKSAE": _batch_topk,
    "MatryoshkaBatchTopKSAE": _matryoshka,
    "JumpReluAutoEncoder": _jumprelu,
}


def _infer_class(keys: set[str], src: Path) -> str:
    if {"r_mag", "gate_bias", "mag_bias"} & keys:
        return "GatedAutoEncoder"
    if "W_enc" in keys:
        return "MatryoshkaBatchTopKSAE" if "k" in keys else "JumpReluAutoEncoder"
    if "encoder.weight" in keys and "k" in keys:
        return "AutoEncoderTopK"
    if "encoder.weight" in keys and "bias" in keys:
        return "AutoEncoder"
    if "encoder.weight" in keys and "decoder.bias" in keys:
        return "AutoEncoderNew"
    raise SAEFormatError(f"{src}: tensor names {sorted(keys)} match no dictionary_learning class.")


# --------------------------------------------------------------------------- loading


def _unpack(obj: Any, src: Path) -> tuple[dict[str, Tensor], dict[str, Any], float | None]:
    """``(state, trainer config from a backup, norm_factor)`` from whatever ``ae.pt`` holds."""
    if not isinstance(obj, Mapping):
        raise SAEFormatError(f"{src}: expected a state dict, found {type(obj).__name__}.")
    trainer: dict[str, Any] = {}
    norm_factor = None
    if set(obj) >= _BACKUP_KEYS:
        config = obj.get("config")
        trainer = dict(config) if isinstance(config, Mapping) else {}
        if obj.get("norm_factor") is not None:
            norm_factor = scalar(obj["norm_factor"], "norm_factor", src)
            if norm_factor <= 0:
                raise SAEFormatError(f"{src}: norm_factor must be positive, got {norm_factor}.")
        obj = obj["ae"]
        if not isinstance(obj, Mapping):
            raise SAEFormatError(f"{src}: the backup's 'ae' entry is not a state dict.")
    state = {str(k).removeprefix(_COMPILED_PREFIX): v for k, v in obj.items()}
    bad = sorted(k for k, v in state.items() if not isinstance(v, Tensor))
    if bad:
        raise SAEFormatError(f"{src}: entries {bad} are not tensors; expected a state dict.")
    return state, trainer, norm_factor


def _site(trainer: Mapping[str, Any]) -> str | None:
    name = trainer.get("submodule_name")
    if isinstance(name, str) and (m := _SUBMODULE.match(name)):
        return f"blocks.{m.group(2)}.{_SUBMODULE_SITE[m.group(1)]}"
    return None


def _check_trainer(trainer: Mapping[str, Any], parts: _Parts, src: Path) -> None:
    d, n = (int(s) for s in parts.tensors["W_enc"].shape)
    for key, actual in (("activation_dim", d), ("dict_size", n)):
        if trainer.get(key) is not None and as_int(trainer[key], key, src) != actual:
            raise SAEFormatError(f"{src}: config says {key}={trainer[key]}, but the tensors have {actual}.")
    if parts.k is not None and trainer.get("k") is not None and as_int(trainer["k"], "k", src) != parts.k:
        raise SAEFormatError(
            f"{src}: config says k={trainer['k']}, but the checkpoint's k buffer is {parts.k}."
        )


def load(path: Path) -> Converted:
    """Convert a dictionary_learning folder or ``.pt`` file."""
    file = path / DICTIONARY_LEARNING_WEIGHTS if path.is_dir() else path
    state, trainer, norm_factor = _unpack(read_torch(file), file)
    if (file.parent / CONFIG_JSON).is_file():
        config = read_json(file.parent / CONFIG_JSON)
        trainer = dict(as_mapping(config.get("trainer"), "trainer", file.parent / CONFIG_JSON)) or trainer
    dict_class = str(trainer.get("dict_class") or _infer_class(set(state), file))
    if dict_class == "GatedAutoEncoder":
        raise unsupported(file, "a gated SAE (GatedAutoEncoder)", "Convert it to JumpReLU.")
    if dict_class not in _CONVERTERS:
        raise unsupported(file, f"dict_class {dict_class!r}", f"Supported: {', '.join(_CONVERTERS)}.")
    parts = _CONVERTERS[dict_class](state, file)
    _check_trainer(trainer, parts, file)
    d, n = (int(s) for s in parts.tensors["W_enc"].shape)
    metadata: dict[str, Any] = {"dict_class": dict_class, **parts.metadata}
    for key in ("layer", "submodule_name", "trainer_class"):
        if trainer.get(key) is not None:
            metadata[key] = trainer[key]
    if norm_factor is not None:
        metadata["norm_factor"] = norm_factor
    cfg = SAEConfig(
        d_in=d,
        d_sae=n,
        activation=parts.activation,
        k=parts.k,
        apply_b_dec_to_input=parts.apply_b_dec_to_input,
        input_scale=1.0 / norm_factor if norm_factor is not None else 1.0,
        hook_site=_site(trainer),
        model_name=as_name(trainer.get("lm_name"), "trainer.lm_name", file),
        source_format="dictionary_learning",
        metadata=metadata,
    )
    weight = state.get("encoder.weight", state.get("W_enc"))
    return Converted(
        cfg=cfg, tensors=parts.tensors, dtype=storage_dtype(weight) if weight is not None else torch.float32
    )


FORMAT = SAEFormat(
    name="dictionary_learning",
    layout=f"{DICTIONARY_LEARNING_WEIGHTS} (+ {CONFIG_JSON} with trainer.dict_class) (dictionary_learning)",
    detect=detect,
    load=load,
)
