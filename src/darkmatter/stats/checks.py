"""Input checks shared by the streaming accumulators (`Moments`, the metrics)."""

from __future__ import annotations

from typing import NoReturn

import torch

from darkmatter.errors import DataError, ShapeError

Tensor = torch.Tensor


def as_rows(name: str, t: Tensor, d: int, n_rows: int | None = None) -> Tensor:
    """Check a chunk is a floating [tokens, d] tensor (a 1-D tensor counts as [tokens, 1] when d == 1)."""
    if not isinstance(t, Tensor):
        raise ShapeError(f"{name}: expected a torch.Tensor of shape [tokens, {d}], found {type(t).__name__}")
    if not t.is_floating_point():
        raise DataError(
            f"{name}: expected a floating-point tensor, found dtype {t.dtype}; cast it with .float()"
        )
    if t.ndim == 1 and d == 1:
        t = t.unsqueeze(1)
    if t.ndim != 2 or t.shape[1] != d:
        raise ShapeError(f"{name}: expected shape [tokens, {d}], found {list(t.shape)}")
    if n_rows is not None and t.shape[0] != n_rows:
        raise ShapeError(f"{name}: expected {n_rows} rows (one per token of x), found {t.shape[0]}")
    return t


def raise_nonfinite(name: str, t: Tensor, chunk: int) -> NoReturn:
    """Raise a DataError that names the offending input and counts its bad values."""
    bad = int((~torch.isfinite(t)).sum())
    raise DataError(
        f"{name} in chunk {chunk} has {bad} NaN/inf value(s) among {t.numel()} (or values so large that "
        "their float64 sum overflows); expected finite values. Check the model dtype (fp16 overflow) and the "
        "activation store for corruption."
    )
