"""Error probes b* on disk: LinearError(x) = x @ weights + bias, one safetensors file per SAE."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from darkmatter import atomic
from darkmatter.errors import StoreError

Probe = tuple[torch.Tensor, torch.Tensor]
"""(weights [d, d], bias [d])."""


def save_probe(path: Path, weights: torch.Tensor, bias: torch.Tensor) -> None:
    """Write an error probe atomically."""
    tensors = {"weights": weights.contiguous().cpu(), "bias": bias.contiguous().cpu()}
    atomic.write_bytes(path, st_save(tensors))


def load_probe(path: Path) -> Probe:
    """(weights [d, d], bias [d]) of a saved error probe."""
    try:
        tensors = load_file(str(path))
        return tensors["weights"], tensors["bias"]
    except Exception as exc:  # safetensors' own errors, or a file without the two tensors
        raise StoreError(
            f"Error probe {path} cannot be read ({exc.__class__.__name__}); delete it and run again to refit."
        ) from exc
