"""Typed, versioned results written atomically as JSON under ``OUT/results/``."""

from __future__ import annotations

import hashlib
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, Field, ValidationError

from darkmatter import __version__
from darkmatter.errors import StoreError
from darkmatter.store import atomic_write_bytes

SCHEMA_VERSION = 1
R = TypeVar("R", bound="Result")


class Provenance(BaseModel):
    """Who and what produced a result."""

    package_version: str = Field(__version__, description="sae-darkmatter version.")
    torch_version: str = Field(torch.__version__, description="PyTorch version.")
    python_version: str = Field(platform.python_version(), description="Python version.")
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


class Result(BaseModel):
    """Base of every experiment result: its name, config hash, seed and provenance."""

    experiment: str = Field(description="Experiment name; also the JSON file name.")
    schema_version: int = Field(SCHEMA_VERSION, description="Version of the result schema.")
    config_hash: str = Field(description="Hash of the config sections this result depends on.")
    seed: int = Field(0, description="Seed used.")
    config: dict[str, Any] = Field(default_factory=dict, description="The config sections used.")
    provenance: Provenance = Field(default_factory=Provenance)


def config_hash(obj: Any) -> str:
    """Short sha256 of a JSON-able config."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sae_identity(sae: Any) -> dict[str, Any]:
    """What identifies an SAE in a result's config."""
    c = sae.cfg
    return {
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "activation": c.activation,
        "k": c.k,
        "hook_site": c.hook_site,
        "model_name": c.model_name,
        "source_format": c.source_format,
    }


def store_summary(store: Any) -> dict[str, Any]:
    """What identifies the activation store a result was computed from."""
    return {
        "identity_hash": store.manifest["identity_hash"],
        "model": store.identity["model"].get("name"),
        "n_contexts": store.n_contexts,
        "ctx_len": store.ctx_len,
        "skip_positions": int(store.identity.get("skip_positions", 0)),
    }


def results_dir(out: str | Path) -> Path:
    return Path(out) / "results"


def write_result(out: str | Path, result: Result) -> Path:
    """Write ``OUT/results/<experiment>.json`` atomically."""
    path = results_dir(out) / f"{result.experiment}.json"
    atomic_write_bytes(path, (result.model_dump_json(indent=2) + "\n").encode())
    return path


def read_result(out: str | Path, experiment: str, cls: type[R]) -> R | None:
    """Read a result, or None when absent; a corrupt file is an error naming it."""
    path = results_dir(out) / f"{experiment}.json"
    if not path.is_file():
        return None
    try:
        return cls.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        raise StoreError(
            f"Result file {path} is corrupt ({exc.__class__.__name__}); delete it to recompute."
        ) from exc


def read_all_results(out: str | Path) -> dict[str, dict[str, Any]]:
    """Every result JSON under ``OUT/results`` as plain dicts (for the report)."""
    found: dict[str, dict[str, Any]] = {}
    d = results_dir(out)
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            try:
                found[p.stem] = json.loads(p.read_text())
            except json.JSONDecodeError as exc:
                raise StoreError(f"Result file {p} is corrupt; delete it to recompute.") from exc
    return found
