"""OpenAI ``sparse_autoencoder`` checkpoints: one ``{layer}.pt`` state dict per layer.

Keys: ``pre_bias [d]`` (``b_dec``, subtracted from the input), ``encoder.weight [n, d]`` (no bias;
``W_enc`` is its transpose), ``latent_bias [n]`` (``b_enc``), ``decoder.weight [d, n]`` (``W_dec`` is its
transpose), stats buffers (ignored), and the plain-Python entries ``activation`` (``"TopK"``/``"ReLU"``)
and ``activation_state_dict`` (``{"k": int, "postact_fn": "ReLU"}``), which ``weights_only`` loading allows.
As in ``Autoencoder.from_state_dict``, TopK checkpoints normalize each token with LayerNorm
(``layer_norm``: unbiased std, eps 1e-5) and the output is re-scaled by the std and shifted by the mean.
The site comes from the path (``resid_post_mlp_v5_32k/autoencoders/5.pt`` -> ``blocks.5.hook_resid_post``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from darkmatter.errors import SAEFormatError
from darkmatter.sae.formats import dictionary_learning
from darkmatter.sae.formats._common import (
    Converted,
    SAEFormat,
    as_int,
    peek_torch_keys,
    read_torch,
    show,
    storage_dtype,
    take,
    unsupported,
)
from darkmatter.sae.model import SAEConfig

_LOCATIONS = {
    "resid_post_mlp": "hook_resid_post",
    "resid_post_attn": "hook_resid_mid",
    "resid_delta_mlp": "hook_mlp_out",
    "resid_delta_attn": "hook_attn_out",
    "mlp_post_act": "mlp.hook_post",
}
_LOCATION = re.compile(r"^(" + "|".join(_LOCATIONS) + r")(_v\d+\w*)?$")
_MODEL_NAME = "gpt2"  # every public OpenAI sparse_autoencoder release is for GPT-2 small


def detect(path: Path) -> bool:
    """A ``.pt`` file with ``pre_bias`` and ``latent_bias`` (or unreadable and not dictionary_learning's)."""
    if not (path.is_file() and path.suffix == ".pt") or path.name.startswith("ae"):
        return False
    keys = peek_torch_keys(path)
    if keys is None:  # let the loader report why it cannot be read
        return not dictionary_learning.is_weights_file(path)
    return {"pre_bias", "latent_bias"} <= keys


def _site(path: Path) -> tuple[str | None, dict[str, Any]]:
    location = next((m.group(1) for part in path.parts if (m := _LOCATION.match(part))), None)
    facts: dict[str, Any] = {"location": location} if location else {}
    if location is None or not path.stem.isdigit():
        return None, facts
    facts["layer"] = int(path.stem)
    return f"blocks.{int(path.stem)}.{_LOCATIONS[location]}", facts


def _activation(state: Mapping[str, Any], src: Path) -> tuple[str, int | None]:
    name = state.get("activation", "ReLU")
    if not isinstance(name, str):
        raise SAEFormatError(f"{src}: 'activation' must be a string such as 'TopK', got {show(name)}.")
    if name == "ReLU":
        return "relu", None
    if name != "TopK":
        raise unsupported(src, f"activation {name!r}", "Only TopK and ReLU are.")
    extra = state.get("activation_state_dict")
    if not isinstance(extra, Mapping) or "k" not in extra:
        raise SAEFormatError(f"{src}: a TopK checkpoint needs activation_state_dict['k'].")
    postact = extra.get("postact_fn", "ReLU")
    if not isinstance(postact, str) or postact != "ReLU":
        raise unsupported(src, f"TopK with postact_fn {show(postact)}", "Only ReLU after the top-k is.")
    return "topk", as_int(extra["k"], "activation_state_dict.k", src)


def load(path: Path) -> Converted:
    """Convert an OpenAI ``.pt`` checkpoint."""
    state = read_torch(path)
    if not isinstance(state, Mapping):
        raise SAEFormatError(f"{path}: expected a state dict, found {type(state).__name__}.")
    if "pre_bias" not in state and dictionary_learning.looks_like_state({str(k) for k in state}):
        return dictionary_learning.load(path)
    enc = state.get("encoder.weight")
    if not isinstance(enc, Tensor) or enc.ndim != 2:
        raise SAEFormatError(
            f"{path}: expected OpenAI keys (pre_bias, encoder.weight, latent_bias, decoder.weight)."
        )
    n, d = (int(s) for s in enc.shape)
    tensors = {
        "W_enc": take(state, "encoder.weight", (n, d), path).T,
        "b_enc": take(state, "latent_bias", (n,), path),
        "W_dec": take(state, "decoder.weight", (d, n), path).T,
        "b_dec": take(state, "pre_bias", (d,), path),
    }
    activation, k = _activation(state, path)
    site, facts = _site(path)
    cfg = SAEConfig(
        d_in=d,
        d_sae=n,
        activation=activation,
        k=k,
        apply_b_dec_to_input=True,
        normalize="layer_norm" if activation == "topk" else "none",
        hook_site=site,
        model_name=_MODEL_NAME if facts.get("location") else None,
        source_format="openai",
        metadata=facts,
    )
    return Converted(cfg=cfg, tensors=tensors, dtype=storage_dtype(enc))


FORMAT = SAEFormat(
    name="openai",
    layout="{layer}.pt with pre_bias, encoder.weight, latent_bias, decoder.weight (OpenAI)",
    detect=detect,
    load=load,
)
