"""Sparse autoencoders: one canonical SAE, loaders for the common formats, and a SAELens-layout saver."""

from __future__ import annotations

from darkmatter.sae.formats import (
    FORMATS,
    canonical_hook_site,
    detect_format,
    known_layouts,
    load_sae,
    save_sae,
)
from darkmatter.sae.model import SAE, InputStats, SAEConfig, SparseCodes, parse_dtype

__all__ = [
    "FORMATS",
    "SAE",
    "InputStats",
    "SAEConfig",
    "SparseCodes",
    "canonical_hook_site",
    "detect_format",
    "known_layouts",
    "load_sae",
    "parse_dtype",
    "save_sae",
]
