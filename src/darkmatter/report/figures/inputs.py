"""Checks on the plain data every plot function takes: flat float arrays, matching lengths, finite ranges."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from darkmatter.errors import ShapeError

Sized = Sequence[Any] | np.ndarray


def _arr(values: Any, name: str) -> np.ndarray:
    """1-D float array; ``None`` becomes NaN."""
    a = np.asarray(values if values is not None else [], dtype=float)
    if a.ndim != 1:
        raise ShapeError(f"{name} must be a flat list of numbers, got an array of shape {a.shape}.")
    return a


def _same_len(ref: str, n: int, **arrays: Sized) -> None:
    """Raise :class:`ShapeError` naming the first of ``arrays`` whose length differs from ``ref``'s ``n``."""
    for name, a in arrays.items():
        if len(a) != n:
            raise ShapeError(
                f"{name} has {len(a)} entries but {ref} has {n}; pass exactly one value per entry of {ref}."
            )


def _finite_range(*arrays: np.ndarray) -> tuple[float, float] | None:
    """(min, max) over the finite values of all ``arrays``; None when there are none."""
    vals = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.array([])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return None
    return float(vals.min()), float(vals.max())
