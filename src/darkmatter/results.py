"""Typed, versioned results written atomically as JSON under ``OUT/results/``."""

from __future__ import annotations

import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, TypeVar

import torch
from pydantic import BaseModel, BeforeValidator, Field, ValidationError

from darkmatter import __version__, atomic
from darkmatter.errors import StoreError
from darkmatter.hashing import stable_hash

SCHEMA_VERSION = 2
R = TypeVar("R", bound="Result")


def _nan_from_null(value: Any) -> Any:
    return math.nan if value is None else value


Number = Annotated[float, BeforeValidator(_nan_from_null)]
"""A float that may be NaN (undefined): written as JSON null, read back as NaN."""


class Provenance(BaseModel):
    """Who and what produced a result."""

    package_version: str = Field(default=__version__, description="sae-darkmatter version.")
    torch_version: str = Field(default=torch.__version__, description="PyTorch version.")
    python_version: str = Field(default=platform.python_version(), description="Python version.")
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


class Result(BaseModel):
    """Base of every step's result: its name, config hash, seed, the config it read, and provenance."""

    experiment: str = Field(default="", description="Step name; also the JSON file name.")
    schema_version: int = Field(default=SCHEMA_VERSION, description="Version of the result schema.")
    config_hash: str = Field(default="", description="The step's key: hash of its config and upstream keys.")
    seed: int = Field(default=0, description="Global seed of the study.")
    config: dict[str, Any] = Field(default_factory=dict, description="The config the step read.")
    error: str | None = Field(
        default=None, description="Set when the step stopped early: why. The result is partial and reruns."
    )
    provenance: Provenance = Field(default_factory=Provenance)


config_hash = stable_hash  # kept for callers that hash a config by that name


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
    atomic.write_text(path, result.model_dump_json(indent=2) + "\n")
    return path


def read_result(out: str | Path, experiment: str, cls: type[R]) -> R | None:
    """Read a result, or None when absent; a corrupt file is an error naming it."""
    path = results_dir(out) / f"{experiment}.json"
    if not path.is_file():
        return None
    try:
        return cls.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, ValidationError) as exc:
        raise StoreError(
            f"Result file {path} is corrupt or from another version ({exc.__class__.__name__}); delete it "
            "to recompute."
        ) from exc
