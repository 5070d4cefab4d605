"""Shared pieces of the format loaders: file names, safe readers, shape checks, exact rewrites, sites."""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor

from darkmatter import atomic
from darkmatter.errors import SAEFormatError
from darkmatter.sae.model import SAEConfig

# --------------------------------------------------------------------------- file names, in one place

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_SPARSITY = "sparsity.safetensors"
SAELENS_SCALER = "activation_scaler.json"
GEMMA_SCOPE_NPZ = "params.npz"
GEMMA_SCOPE_2_WEIGHTS = "params.safetensors"
CONFIG_JSON = "config.json"  # Gemma Scope 2, llamascopium, dictionary_learning
LLAMA_SCOPE_HYPERPARAMS = "hyperparams.json"
LLAMA_SCOPE_WEIGHTS = "checkpoints/final.safetensors"
LLAMASCOPIUM_WEIGHTS = (
    "sae_weights.safetensors",
    "sae_weights.pt",
    "checkpoints/pruned.safetensors",
    "checkpoints/pruned.pt",
    "checkpoints/final.safetensors",
    "checkpoints/final.pt",
)
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"

# Files that stand for the folder they live in when a user points at them.
MEMBER_FILES = frozenset(
    {
        SAELENS_CFG,
        SAELENS_WEIGHTS,
        SAELENS_SPARSITY,
        SAELENS_SCALER,
        GEMMA_SCOPE_2_WEIGHTS,
        CONFIG_JSON,
        LLAMA_SCOPE_HYPERPARAMS,
        SPARSIFY_WEIGHTS,
    }
)


# --------------------------------------------------------------------------- the registry's types


@dataclass
class Converted:
    """A source SAE rewritten into canonical tensors (any float dtype) plus its config."""

    cfg: SAEConfig
    tensors: dict[str, Tensor]
    dtype: torch.dtype
    """The dtype the source stores its weights in; the default dtype of the loaded SAE."""


@dataclass(frozen=True)
class SAEFormat:
    """One on-disk layout: how to recognise it and how to convert it into the canonical SAE."""

    name: str
    layout: str
    """Human description of the files, used in error messages."""
    detect: Callable[[Path], bool]
    load: Callable[[Path], Converted]


# --------------------------------------------------------------------------- safe readers


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or SAEFormatError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise SAEFormatError(f"{path}: file not found.") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SAEFormatError(f"{path}: not a readable JSON file ({err}).") from err
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file is an SAEFormatError naming it."""
    if not path.is_file():
        raise SAEFormatError(f"{path}: file not found.")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise SAEFormatError(f"{path}: corrupt or truncated safetensors file ({err}).") from err


def read_npz(path: Path) -> dict[str, Tensor]:
    """All arrays of an ``.npz`` file as tensors; object arrays (pickles) are refused."""
    if not path.is_file():
        raise SAEFormatError(f"{path}: file not found.")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: np.asarray(npz[name]) for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise SAEFormatError(f"{path}: corrupt or truncated .npz file ({err}).") from err
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items()}


def read_torch(path: Path) -> Any:
    """Unpickle ``path`` with ``weights_only=True``: tensors and plain containers only, never code."""
    if not path.is_file():
        raise SAEFormatError(f"{path}: file not found.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err).lower():
            raise SAEFormatError(
                f"{path}: refused to unpickle. The file holds Python objects other than tensors and plain "
                f"containers (str, int, float, dict, list), and loading it would execute code. If you trust "
                f"it, convert it once in a separate process: sd = torch.load(path, weights_only=False); keep "
                f"only tensors, numbers and strings; torch.save(sd, new_path); then load new_path."
            ) from err
        raise SAEFormatError(f"{path}: corrupt or truncated torch file ({err}).") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise SAEFormatError(f"{path}: corrupt or truncated torch file ({err}).") from err


def peek_torch_keys(path: Path) -> set[str] | None:
    """Top-level keys of a torch checkpoint (memory-mapped, safe), or None when it cannot be read."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile):
        return None
    return {str(k) for k in obj} if isinstance(obj, Mapping) else None


# --------------------------------------------------------------------------- config and shape checks


def require(cfg: Mapping[str, Any], key: str, source: Path | str) -> Any:
    """``cfg[key]``, or SAEFormatError saying which file lacks it."""
    if key not in cfg or cfg[key] is None:
        raise SAEFormatError(f"{source}: missing required field {key!r}.")
    return cfg[key]


def as_int(value: Any, key: str, source: Path | str) -> int:
    """A positive int config value (``4096.0`` is accepted), or SAEFormatError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or int(value) != value:
        raise SAEFormatError(f"{source}: {key} must be a positive integer, got {value!r}.")
    return int(value)


def take(tensors: Mapping[str, Tensor], key: str, shape: tuple[int, ...], source: Path | str) -> Tensor:
    """``tensors[key]`` checked against ``shape`` from the config (never trusting a transpose)."""
    if key not in tensors:
        raise SAEFormatError(f"{source}: tensor {key!r} is missing; found {sorted(tensors)}.")
    value = tensors[key]
    if tuple(value.shape) != shape:
        raise SAEFormatError(
            f"{source}: tensor {key!r} has shape {tuple(value.shape)}, but the config implies {shape}. "
            f"The config contradicts the weights (or the tensor is stored transposed)."
        )
    if not value.dtype.is_floating_point:
        raise SAEFormatError(f"{source}: tensor {key!r} has dtype {value.dtype}; expected floating point.")
    return value


def scalar(value: Any, key: str, source: Path | str) -> float:
    """A finite float from a number or one-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise SAEFormatError(f"{source}: {key} must be a scalar, got shape {tuple(value.shape)}.")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise SAEFormatError(f"{source}: {key} must be a finite number, got {value!r}.")
    return float(value)


def storage_dtype(value: Tensor) -> torch.dtype:
    """The dtype to load into by default: the stored one when it is floating point."""
    return value.dtype if value.dtype.is_floating_point else torch.float32


def wide(value: Tensor) -> Tensor:
    """At least float32, for exact rewrites of half-precision weights."""
    return value if value.dtype in (torch.float32, torch.float64) else value.float()


def unsupported(source: Path | str, what: str, hint: str = "") -> SAEFormatError:
    """The error for a recognised but unsupported variant."""
    return SAEFormatError(
        f"{source}: {what} is not supported by darkmatter's canonical SAE.{' ' + hint if hint else ''}"
    )


# --------------------------------------------------------------------------- exact rewrites


def unit_decoder_norm(tensors: dict[str, Tensor], *, scale_threshold: bool) -> dict[str, Tensor]:
    """Rescale latent ``i`` by ``n_i = ||W_dec[i]||`` so every decoder row has unit norm.

    ``W_enc[:, i] *= n_i``, ``b_enc[i] *= n_i``, ``W_dec[i] /= n_i``: pre-activations become ``pre_i * n_i``
    and ``(pre_i * n_i) * (W_dec[i] / n_i)`` decodes to the same vector, so the SAE computes the same
    function. Sources that gate on ``pre_i * n_i`` (Llama Scope ``sparsity_include_decoder_norm``, SAELens
    ``rescale_acts_by_decoder_norm``) keep their threshold; sources that gate on the unscaled ``pre_i`` and
    report ``code_i * n_i`` (dictionary_learning JumpReLU) need ``threshold[i] *= n_i`` (``scale_threshold``).
    A latent with an all-zero decoder row gets an all-zero encoder column: it never fires, as in the source.
    """
    out = {k: wide(v) for k, v in tensors.items()}
    norms = out["W_dec"].norm(dim=1)  # [d_sae]
    out["W_enc"] = out["W_enc"] * norms
    out["b_enc"] = out["b_enc"] * norms
    out["W_dec"] = out["W_dec"] / torch.where(norms == 0, torch.ones_like(norms), norms)[:, None]
    if scale_threshold and "threshold" in out:
        out["threshold"] = out["threshold"] * norms
    return out


def fold_b_dec_into_b_enc(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``(x - b_dec) @ W_enc + b_enc == x @ W_enc + (b_enc - b_dec @ W_enc)``: drop the input subtraction."""
    out = {k: wide(v) for k, v in tensors.items()}
    out["b_enc"] = out["b_enc"] - out["b_dec"] @ out["W_enc"]
    return out


# --------------------------------------------------------------------------- hook sites

_TL_SITE = re.compile(r"^(hook_embed|hook_pos_embed|blocks\.\d+\.[A-Za-z_][\w.]*)$")
_HF_BLOCK_OUTPUT = re.compile(r"^(?:[\w.]*\.)?(?:layers|h)\.(\d+)(?:\.output)?$")
_HF_POST_NORM = re.compile(
    r"^(?:[\w.]*\.)?layers\.(\d+)\.(post_feedforward_layernorm|post_attention_layernorm)\.output$"
)
_POST_NORM_SITE = {"post_feedforward_layernorm": "hook_mlp_out", "post_attention_layernorm": "hook_attn_out"}


def canonical_hook_site(name: str | None) -> str | None:
    """Map a source's hook name to the canonical TransformerLens-style site, or None when not derivable.

    TransformerLens names pass through; HF block outputs (``layers.12``, ``model.layers.12.output``,
    ``gpt_neox.layers.12``, ``transformer.h.12``) are ``blocks.12.hook_resid_post``; Gemma post-sublayer norm
    outputs are ``hook_mlp_out`` / ``hook_attn_out``. Sub-module outputs such as ``layers.12.mlp`` are left
    unmapped: whether they equal ``hook_mlp_out`` depends on the architecture (Gemma's post-norms).
    """
    if not name:
        return None
    if _TL_SITE.match(name):
        return name
    if match := _HF_BLOCK_OUTPUT.match(name):
        return f"blocks.{match.group(1)}.hook_resid_post"
    if match := _HF_POST_NORM.match(name):
        return f"blocks.{match.group(1)}.{_POST_NORM_SITE[match.group(2)]}"
    return None


def site_metadata(source_name: str | None, site: str | None) -> dict[str, Any]:
    """Keep the source's own hook name when it differs from the canonical one."""
    return {"source_hook_name": source_name} if source_name and source_name != site else {}


# --------------------------------------------------------------------------- atomic writes


def atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write pretty JSON atomically and durably, keys in the order given (``darkmatter.atomic``)."""
    atomic.write_json(path, data, sort_keys=False)


def atomic_write_safetensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """Write contiguous CPU copies of ``tensors`` atomically and durably (``darkmatter.atomic``)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic.target(path) as tmp:
        safetensors.torch.save_file(flat, str(tmp), metadata={"format": "pt"})
