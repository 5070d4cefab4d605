"""Shared pieces of the format loaders: file names, safe readers, shape checks, exact rewrites, sites."""

from __future__ import annotations

import json
import math
import pickle
import re
import struct
import sys
import warnings
import zipfile
import zlib
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
from darkmatter.errors import DataError, SAEFormatError
from darkmatter.sae.model import SAE, SAEConfig

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

# What a damaged file makes each reader raise (torch's weights-only unpickler and zipfile are pure Python
# over untrusted bytes, so a flipped byte can surface as almost any of these).
_CORRUPT_ZIP = (
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    EOFError,
    OSError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    NotImplementedError,
    OverflowError,
    MemoryError,
    RuntimeError,  # zipfile: "File ... is encrypted"; torch: PytorchStreamReader failures
)
_CORRUPT_PICKLE = (
    *_CORRUPT_ZIP,
    pickle.UnpicklingError,
    AttributeError,
    RecursionError,
)
_CODE_REFUSAL = re.compile(r"global|class|reduce|instantiate", re.IGNORECASE)
_MAX_SHOWN = 80


def one_line(text: object, limit: int = 300) -> str:
    """``text`` with whitespace runs collapsed to single spaces, cut at ``limit`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def show(value: Any) -> str:
    """A short one-line ``repr`` of a config value or tensor, for error messages."""
    if isinstance(value, Tensor):
        return f"a {dtype_label(value)} tensor of shape {tuple(value.shape)}"
    return one_line(repr(value), _MAX_SHOWN)


def dtype_label(value: Tensor) -> str:
    """``torch.float32`` -> ``float32``."""
    return str(value.dtype).removeprefix("torch.")


def _reason(err: BaseException) -> str:
    return one_line(f"{type(err).__name__}: {err}", 200)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or SAEFormatError naming the file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise SAEFormatError(f"{path}: file not found.") from err
    except (OSError, ValueError, RecursionError) as err:  # ValueError covers JSON and UTF-8 errors
        raise SAEFormatError(f"{path}: not a readable JSON file ({_reason(err)}).") from err
    if not isinstance(data, dict):
        raise SAEFormatError(f"{path}: expected a JSON object, found {type(data).__name__}.")
    return data


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file; a truncated or corrupt file is an SAEFormatError naming it."""
    if not path.is_file():
        raise SAEFormatError(f"{path}: file not found (or not a file).")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, MemoryError) as err:
        raise SAEFormatError(f"{path}: corrupt or truncated safetensors file ({_reason(err)}).") from err


def read_npz(path: Path) -> dict[str, Tensor]:
    """All arrays of an ``.npz`` file as tensors; object arrays (pickles) are refused, never unpickled."""
    if not path.is_file():
        raise SAEFormatError(f"{path}: file not found (or not a file).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: np.asarray(npz[name]) for name in npz.files}
    except _CORRUPT_ZIP as err:
        raise SAEFormatError(f"{path}: corrupt or truncated .npz file ({_reason(err)}).") from err
    return {name: _numeric_tensor(a, name, path) for name, a in arrays.items()}


def _numeric_tensor(array: np.ndarray, name: str, path: Path) -> Tensor:
    """``array`` as a tensor (byte-swapped to native order first when stored big-endian)."""
    if array.dtype.kind not in "biufc":
        raise SAEFormatError(
            f"{path}: array {name!r} has dtype {array.dtype} ({array.dtype.kind!r}); expected numbers."
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError as err:  # numbers torch has no dtype for (float128, ...)
        raise SAEFormatError(
            f"{path}: array {name!r} has dtype {array.dtype}, which torch cannot hold."
        ) from err


def _torch_load(path: Path, *, mmap: bool = False) -> Any:
    """``torch.load`` restricted to tensors and plain containers, without torch's warning about the pickle
    protocol of a damaged file (the error that follows says what is wrong)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def read_torch(path: Path) -> Any:
    """Unpickle ``path`` with ``weights_only=True``: tensors and plain containers only, never code."""
    if not path.is_file():
        raise SAEFormatError(f"{path}: file not found (or not a file).")
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as err:
        detail = (str(err).partition("WeightsUnpickler error:")[2].strip().splitlines() or [""])[0]
        if _CODE_REFUSAL.search(detail):  # a global or class the allow-list refuses, not broken bytes
            raise SAEFormatError(
                f"{path}: refused to unpickle. The file holds Python objects other than tensors and plain "
                f"containers (str, int, float, dict, list), and loading it would execute code. If you trust "
                f"it, convert it once in a separate process: sd = torch.load(path, weights_only=False); keep "
                f"only tensors, numbers and strings; torch.save(sd, new_path); then load new_path."
            ) from err
        raise SAEFormatError(
            f"{path}: corrupt or truncated torch file ({one_line(detail or err, 200)})."
        ) from err
    except _CORRUPT_PICKLE as err:
        raise SAEFormatError(f"{path}: corrupt or truncated torch file ({_reason(err)}).") from err


def peek_torch_keys(path: Path) -> set[str] | None:
    """Top-level keys of a torch checkpoint (memory-mapped, safe), or None when it cannot be read."""
    try:
        obj = _torch_load(path, mmap=True)
    except _CORRUPT_PICKLE:
        return None
    return {str(k) for k in obj} if isinstance(obj, Mapping) else None


# --------------------------------------------------------------------------- config and shape checks


def require(cfg: Mapping[str, Any], key: str, source: Path | str) -> Any:
    """``cfg[key]``, or SAEFormatError saying which file lacks it."""
    if key not in cfg or cfg[key] is None:
        raise SAEFormatError(f"{source}: missing required field {key!r}.")
    return cfg[key]


_MAX_INT = 2**53  # no real size comes near it; below it every int converts to a float exactly


def as_int(value: Any, key: str, source: Path | str) -> int:
    """A positive int config value (``4096.0`` is accepted) below 2**53, or SAEFormatError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and not math.isfinite(value))
        or not 0 < value <= _MAX_INT
        or int(value) != value
    ):
        raise SAEFormatError(f"{source}: {key} must be a positive integer (<= 2**53), got {show(value)}.")
    return int(value)


def filled(n: int, value: float) -> Tensor:
    """A float32 ``[n]`` tensor of ``value``; beyond float32's range it is inf (then a DataError)."""
    return torch.full((n,), value, dtype=torch.float64).float()


def as_name(value: Any, key: str, source: Path | str) -> str | None:
    """A string config value (a hook or model name), ``None`` when absent, or SAEFormatError."""
    if value is None or isinstance(value, str):
        return value
    raise SAEFormatError(f"{source}: {key} must be a string, got {show(value)}.")


def as_mapping(value: Any, key: str, source: Path | str) -> Mapping[str, Any]:
    """A JSON object config value (``{}`` when absent), or SAEFormatError."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SAEFormatError(f"{source}: {key} must be an object, got {show(value)}.")
    return value


def as_flag(value: Any, key: str, source: Path | str, default: bool) -> bool:
    """A boolean config value (``0``/``1`` accepted; ``default`` when absent), or SAEFormatError."""
    if value is None:
        return default
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise SAEFormatError(f"{source}: {key} must be true or false, got {show(value)}.")


def take(tensors: Mapping[str, Any], key: str, shape: tuple[int, ...], source: Path | str) -> Tensor:
    """``tensors[key]`` checked against ``shape`` from the config (never trusting a transpose)."""
    if key not in tensors:
        raise SAEFormatError(
            f"{source}: tensor {key!r} is missing; found {one_line(sorted(map(str, tensors)))}."
        )
    value = tensors[key]
    if not isinstance(value, Tensor):
        raise SAEFormatError(f"{source}: {key!r} must be a tensor, found {type(value).__name__}.")
    if tuple(value.shape) != shape:
        raise SAEFormatError(
            f"{source}: tensor {key!r} has shape {tuple(value.shape)}, but the config implies {shape}. "
            f"The config contradicts the weights (or the tensor is stored transposed)."
        )
    if not value.dtype.is_floating_point:
        raise SAEFormatError(
            f"{source}: tensor {key!r} has dtype {dtype_label(value)}; expected floating point."
        )
    return value


def scalar(value: Any, key: str, source: Path | str) -> float:
    """A finite float from a number or one-element tensor."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise SAEFormatError(f"{source}: {key} must be a scalar, got shape {tuple(value.shape)}.")
        value = value.item()
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or abs(value) > sys.float_info.max  # an int too large for a float
        or not math.isfinite(value)
    ):
        raise SAEFormatError(f"{source}: {key} must be a finite number, got {show(value)}.")
    return float(value)


PLAUSIBLE = 1e10
"""No trained SAE parameter or input scale comes near this magnitude; a flipped exponent bit does."""


def check_plausible(sae: SAE) -> None:
    """DataError when a parameter or the input scale is finite but too large (or small) to be real.

    Such values pass the finiteness check but overflow the first time the SAE is used.
    """
    scale = sae.cfg.input_scale
    if not 1 / PLAUSIBLE <= scale <= PLAUSIBLE:
        raise DataError(
            f"input_scale={scale:.6g} is implausible (expected between 1e-10 and 1e10); the SAE's scaling "
            f"(an average activation norm or norm factor) is damaged."
        )
    for name, tensor in sae.named_tensors():
        low, high = (float(v) for v in torch.aminmax(tensor.detach()))
        if max(-low, high) > PLAUSIBLE:
            raise DataError(
                f"Tensor {name} holds values up to {max(-low, high):.3g} in magnitude; trained weights stay "
                f"far below 1e10, so the file is damaged (a flipped exponent bit?)."
            )


def storage_dtype(value: Tensor) -> torch.dtype:
    """The dtype to load into by default: the stored one when it is floating point."""
    return value.dtype if value.dtype.is_floating_point else torch.float32


def wide(value: Tensor) -> Tensor:
    """At least float32, for exact rewrites of half-precision weights."""
    return value if value.dtype in (torch.float32, torch.float64) else value.float()


def widen_all(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """All tensors in one dtype of at least float32 (float64 when any is): matmuls need one dtype."""
    dtype = torch.float64 if any(v.dtype == torch.float64 for v in tensors.values()) else torch.float32
    return {k: v.to(dtype) for k, v in tensors.items()}


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
    out = widen_all(tensors)
    norms = out["W_dec"].norm(dim=1)  # [d_sae]
    out["W_enc"] = out["W_enc"] * norms
    out["b_enc"] = out["b_enc"] * norms
    out["W_dec"] = out["W_dec"] / torch.where(norms == 0, torch.ones_like(norms), norms)[:, None]
    if scale_threshold and "threshold" in out:
        out["threshold"] = out["threshold"] * norms
    return out


def fold_b_dec_into_b_enc(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``(x - b_dec) @ W_enc + b_enc == x @ W_enc + (b_enc - b_dec @ W_enc)``: drop the input subtraction."""
    out = widen_all(tensors)
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
