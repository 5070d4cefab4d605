"""Cheap checks that a step's files are whole (headers and footers read, not the data): a truncated or
garbled file makes its step rerun instead of failing a later one."""

from __future__ import annotations

import json
from pathlib import Path

SAE_CONFIG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"


def safetensors_ok(path: Path) -> bool:
    """The file exists and its header matches its size (what safetensors checks on open)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception:  # safetensors raises its own (untyped) errors for any damage
        return False
    return True


def parquet_ok(path: Path) -> bool:
    """The file (or every listed part of a table written by several ranks) ends with a readable footer."""
    import pyarrow.parquet as pq

    from darkmatter.experiments.decomposition.table import table_files

    try:
        for part in table_files(path):
            pq.read_metadata(part)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def sae_folder_ok(folder: Path) -> bool:
    """An SAE the study saved (SAELens layout): its config parses and its weights file is whole."""
    try:
        json.loads((folder / SAE_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return safetensors_ok(folder / SAE_WEIGHTS)
