"""Study configuration: the schema (``schema``), presets as TOML files (``presets/``) and their loading."""

from __future__ import annotations

from darkmatter.config.loading import (
    load_preset,
    parse_override,
    preset_names,
    read_config_file,
    resolve_config,
)
from darkmatter.config.schema import (
    DownstreamCEConfig,
    EarlierLayersConfig,
    ErrorSAEsConfig,
    ExternalSAE,
    FamilyConfig,
    InterpConfig,
    LayerSweepConfig,
    ModelConfig,
    PursuitConfig,
    StudyConfig,
    SyntheticConfig,
)

__all__ = [
    "DownstreamCEConfig",
    "EarlierLayersConfig",
    "ErrorSAEsConfig",
    "ExternalSAE",
    "FamilyConfig",
    "InterpConfig",
    "LayerSweepConfig",
    "ModelConfig",
    "PursuitConfig",
    "StudyConfig",
    "SyntheticConfig",
    "load_preset",
    "parse_override",
    "preset_names",
    "read_config_file",
    "resolve_config",
]
