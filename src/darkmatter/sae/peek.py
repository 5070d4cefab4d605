"""An SAE's input width from its small files and array headers, without reading its tensors.

Used before any work to refuse an SAE of another model in the first seconds. Returns None when the width
cannot be told cheaply (a hub id not yet downloaded, an unfamiliar layout); loading the SAE then checks it.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

_CONFIG_FILES = ("cfg.json", "hyperparams.json", "config.json")
_WIDTH_KEYS = ("d_in", "d_model", "activation_dim", "hidden_size")


def peek_width(path: str | Path, *, hookpoint: str | None = None) -> int | None:
    """The SAE's ``d_in`` read from its config file or from ``params.npz``'s ``W_enc`` header, or None."""
    folder = Path(path).expanduser()
    if hookpoint:
        folder = folder / hookpoint
    if not folder.is_dir():
        return None
    for name in _CONFIG_FILES:
        width = _config_width(folder / name)
        if width is not None:
            return width
    npz = folder / "params.npz"
    if npz.is_file():
        return _npz_width(npz)
    return None


def _config_width(path: Path) -> int | None:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    for scope in (cfg, cfg.get("trainer") if isinstance(cfg, dict) else None):
        width = _width_in(scope)
        if width is not None:
            return width
    return None


def _width_in(cfg: Any) -> int | None:
    if not isinstance(cfg, dict):
        return None
    for key in _WIDTH_KEYS:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _npz_width(path: Path) -> int | None:
    """``W_enc [d_in, d_sae]``'s first dimension from the array header inside the zip archive."""
    shape = npz_shape(path, "W_enc.npy")
    return int(shape[0]) if shape is not None and len(shape) == 2 else None


def npz_shape(path: Path, member: str) -> tuple[int, ...] | None:
    """The shape of array ``member`` of an ``.npz`` archive, read from its header (no data), or None."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(member) as f:
            major, _ = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _, _ = read(f)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    return tuple(int(n) for n in shape)
