"""Gemma Scope JumpReLU SAEs.

v1 (Gemma 2): ``params.npz`` with ``W_enc, W_dec, b_enc, b_dec, threshold`` (sometimes lowercase ``w_*``), no
config. Width, layer and target L0 come from the path ``.../layer_L/width_16k/average_l0_N/params.npz``; the
site from the repo suffix (``gemma-scope-2b-pt-res`` -> ``hook_resid_post``, ``-mlp`` -> ``hook_mlp_out``,
``-att`` -> ``attn.hook_z`` with heads flattened) when the path keeps the repo name (the HF cache does).

v2 (Gemma 3): ``params.safetensors`` (lowercase ``w_enc, w_dec, b_enc, b_dec, threshold``) + ``config.json``
(``architecture: "jump_relu"``, ``hf_hook_point_in``, ``width``, ``l0``, ``model_name``).

Both: ``pre = x @ W_enc + b_enc``, codes ``relu(pre) * (pre > threshold)``, no ``b_dec`` subtraction and no
input scaling (the training normalization is folded into the released weights). Transcoders are refused.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from darkmatter.errors import SAEFormatError
from darkmatter.sae.formats._common import (
    CONFIG_JSON,
    GEMMA_SCOPE_2_WEIGHTS,
    GEMMA_SCOPE_NPZ,
    Converted,
    SAEFormat,
    as_flag,
    as_int,
    as_name,
    canonical_hook_site,
    read_json,
    read_npz,
    read_safetensors,
    site_metadata,
    storage_dtype,
    take,
    unsupported,
)
from darkmatter.sae.model import SAEConfig

_NAMES = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
_LAYER = re.compile(r"^layer_(\d+)$")
_WIDTH = re.compile(r"^width_([1-9]\d*)([km])$")
_L0 = re.compile(r"^average_l0_(\d+)$")
_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)(?![\w])")
_V1_SITES = {"res": "hook_resid_post", "mlp": "hook_mlp_out", "att": "attn.hook_z"}
_V2_FOLDER = re.compile(r"^layer_(\d+)_width_([1-9]\d*[km])_l0_([a-z0-9]+)(_affine)?$")
_V2_CATEGORY = re.compile(r"^(resid_post|mlp_out|attn_out|transcoder)(_all)?$")
_V2_SITES = {"resid_post": "hook_resid_post", "mlp_out": "hook_mlp_out", "attn_out": "hook_attn_out"}


def width_from_label(label: str) -> int:
    """``16k`` -> 16384, ``1m`` -> 1048576: Gemma Scope widths are powers of two named in round thousands."""
    number, unit = int(label[:-1]), label[-1]
    return 2 ** round(math.log2(number * (1_000 if unit == "k" else 1_000_000)))


def _canonical_names(raw: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    """Map ``w_enc``/``W_enc``/... to canonical names, whatever the case."""
    by_lower = {name.lower(): name for name in raw}
    missing = [n for n in _NAMES if n.lower() not in by_lower]
    if missing:
        raise SAEFormatError(f"{source}: tensors {missing} are missing; found {sorted(raw)}.")
    return {n: raw[by_lower[n.lower()]] for n in _NAMES}


def _shaped(raw: dict[str, Tensor], source: Path) -> tuple[dict[str, Tensor], int, int]:
    """Canonical tensors with every shape checked against ``W_enc [d_in, d_sae]``."""
    named = _canonical_names(raw, source)
    if named["W_enc"].ndim != 2:
        raise SAEFormatError(f"{source}: W_enc must be 2-D, got shape {tuple(named['W_enc'].shape)}.")
    d_in, d_sae = (int(s) for s in named["W_enc"].shape)
    shapes = {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_in),
        "b_enc": (d_sae,),
        "b_dec": (d_in,),
        "threshold": (d_sae,),
    }
    return {n: take(named, n, shapes[n], source) for n in _NAMES}, d_in, d_sae


# --------------------------------------------------------------------------- v1 (params.npz)


def detect_v1(path: Path) -> bool:
    """A folder with ``params.npz`` or an ``.npz`` file."""
    return (path.is_dir() and (path / GEMMA_SCOPE_NPZ).is_file()) or (
        path.is_file() and path.suffix == ".npz"
    )


def _v1_path_facts(path: Path) -> dict[str, Any]:
    """Layer, width, L0, size, variant and site read from the folder names (absent ones are omitted)."""
    facts: dict[str, Any] = {}
    for part in path.parts:
        if m := _LAYER.match(part):
            facts["layer"] = int(m.group(1))
        elif m := _WIDTH.match(part):
            facts["width_label"] = part.removeprefix("width_")
            facts["width"] = width_from_label(facts["width_label"])
        elif m := _L0.match(part):
            facts["average_l0"] = int(m.group(1))
        elif part == "embedding":
            facts["embedding"] = True
    if repo := _REPO.search(path.as_posix()):
        facts.update(size=repo.group(1), variant=repo.group(2), site=repo.group(3))
    return facts


def _v1_site(facts: dict[str, Any], source: Path) -> str | None:
    if facts.get("site") == "transcoders":
        raise unsupported(source, "a Gemma Scope transcoder (reads one site, writes another)")
    if "layer" not in facts or "site" not in facts or facts.get("embedding"):
        return None
    return f"blocks.{facts['layer']}.{_V1_SITES[facts['site']]}"


def _check_width(facts: dict[str, Any], d_sae: int, source: Path) -> None:
    if "width" in facts and facts["width"] != d_sae:
        raise SAEFormatError(
            f"{source}: the path says width_{facts['width_label']} ({facts['width']} latents), but the "
            f"tensors have d_sae={d_sae}. The file is in the wrong folder or is not the SAE the path names."
        )


def load_v1(path: Path) -> Converted:
    """Convert a Gemma Scope v1 ``params.npz``."""
    file = path / GEMMA_SCOPE_NPZ if path.is_dir() else path
    tensors, d_in, d_sae = _shaped(read_npz(file), file)
    facts = _v1_path_facts(file.parent)
    _check_width(facts, d_sae, file)
    site = _v1_site(facts, file)
    model = (
        f"google/gemma-2-{facts['size']}" + ("-it" if facts["variant"] == "it" else "")
        if "size" in facts
        else None
    )
    metadata = {k: v for k, v in facts.items() if k in ("layer", "average_l0", "width_label", "embedding")}
    if facts.get("site") == "att":
        metadata["reshape_activations"] = "hook_z"
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        activation="jumprelu",
        apply_b_dec_to_input=False,
        hook_site=site,
        model_name=model,
        source_format="gemma_scope",
        metadata=metadata,
    )
    return Converted(cfg=cfg, tensors=tensors, dtype=storage_dtype(tensors["W_enc"]))


# --------------------------------------------------------------------------- v2 (params.safetensors)


def detect_v2(path: Path) -> bool:
    """A folder with ``params.safetensors``."""
    return path.is_dir() and (path / GEMMA_SCOPE_2_WEIGHTS).is_file()


def _v2_refuse_transcoders(config: dict[str, Any], path: Path) -> None:
    src = path / CONFIG_JSON
    hook_in = as_name(config.get("hf_hook_point_in"), "hf_hook_point_in", src)
    hook_out = as_name(config.get("hf_hook_point_out"), "hf_hook_point_out", src)
    category = _V2_CATEGORY.match(path.parent.name)
    is_transcoder = (
        config.get("type", "sae") not in ("sae", None)
        or as_flag(config.get("affine_connection"), "affine_connection", src, False)
        or (hook_out is not None and hook_out != hook_in)
        or (category is not None and category.group(1) == "transcoder")
    )
    if is_transcoder:
        raise unsupported(path, "a Gemma Scope 2 transcoder (reads one site, writes another)")
    architecture = config.get("architecture", "jump_relu")
    if architecture not in ("jump_relu", "jumprelu"):
        raise unsupported(path, f"Gemma Scope 2 architecture {architecture!r}")


def _v2_site(config: dict[str, Any], path: Path) -> str | None:
    site = canonical_hook_site(config.get("hf_hook_point_in"))
    folder, category = _V2_FOLDER.match(path.name), _V2_CATEGORY.match(path.parent.name)
    if site is None and folder and category and category.group(1) in _V2_SITES:
        site = f"blocks.{int(folder.group(1))}.{_V2_SITES[category.group(1)]}"
    return site


def load_v2(path: Path) -> Converted:
    """Convert a Gemma Scope 2 folder."""
    config = read_json(path / CONFIG_JSON) if (path / CONFIG_JSON).is_file() else {}
    _v2_refuse_transcoders(config, path)
    file = path / GEMMA_SCOPE_2_WEIGHTS
    tensors, d_in, d_sae = _shaped(read_safetensors(file), file)
    if config.get("width") is not None and as_int(config["width"], "width", path / CONFIG_JSON) != d_sae:
        raise SAEFormatError(
            f"{path / CONFIG_JSON}: width={config['width']} but the tensors have d_sae={d_sae}."
        )
    if folder := _V2_FOLDER.match(path.name):
        _check_width(
            {"width": width_from_label(folder.group(2)), "width_label": folder.group(2)}, d_sae, file
        )
    model = as_name(config.get("model_name"), "model_name", path / CONFIG_JSON)
    if model is not None and "/" not in model:
        model = f"google/{model}"
    hook_in = config.get("hf_hook_point_in")
    site = _v2_site(config, path)
    metadata: dict[str, Any] = {k: config[k] for k in ("l0", "width") if k in config}
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        activation="jumprelu",
        apply_b_dec_to_input=False,
        hook_site=site,
        model_name=model,
        source_format="gemma_scope_2",
        metadata={**site_metadata(hook_in, site), **metadata},
    )
    return Converted(cfg=cfg, tensors=tensors, dtype=storage_dtype(tensors["W_enc"]))


FORMAT_V1 = SAEFormat(
    name="gemma_scope",
    layout=f"{GEMMA_SCOPE_NPZ} (Gemma Scope v1; layer/width/L0 from .../layer_L/width_W/average_l0_N/)",
    detect=detect_v1,
    load=load_v1,
)
FORMAT_V2 = SAEFormat(
    name="gemma_scope_2",
    layout=f"{GEMMA_SCOPE_2_WEIGHTS} + {CONFIG_JSON} (Gemma Scope 2)",
    detect=detect_v2,
    load=load_v2,
)


def hub_path(model: str, site: str, layer: int, width: str, average_l0: int) -> str:
    """A Gemma Scope (Gemma 2, pretrained) SAE as ``repo:subfolder``, as the paper presets name them.

    ``model`` is ``2b``, ``9b`` or ``27b``; ``site`` ``res``, ``mlp`` or ``att``; ``width`` the folder's label
    (``16k`` ... ``1m``); ``average_l0`` the published L0 in the folder name.
    """
    return f"google/gemma-scope-{model}-pt-{site}:layer_{layer}/width_{width}/average_l0_{average_l0}"
