"""Sparse codes: the active latents of each token, padded to a common width, and how they are packed."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class SparseCodes:
    """Active latents per token: entry ``j`` of a token is active iff ``values[..., j] != 0``.

    Rows are padded with index 0 / value 0.0 to a common width ``m`` (``k`` for topk, otherwise the largest
    active count in the batch). The order of entries within a row is unspecified.
    """

    indices: Tensor  # [..., m] int64
    values: Tensor  # [..., m]

    @property
    def width(self) -> int:
        """``m``, the padded number of entries per token."""
        return int(self.indices.shape[-1])

    def l0(self) -> Tensor:
        """Number of active latents per token, ``[...]`` int64."""
        return (self.values != 0).sum(dim=-1)

    def to_dense(self, d_sae: int) -> Tensor:
        """Scatter into a dense ``[..., d_sae]`` tensor."""
        dense = self.values.new_zeros((*self.values.shape[:-1], d_sae))
        return dense.scatter_add_(-1, self.indices, self.values)


def pack_dense(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Non-zero entries of dense codes ``[n, d_sae]`` as padded ``(indices, values) [n, m]``, sorted.

    Extra memory is proportional to the active count: no top-m over all latents, and no ``sum`` or
    ``count_nonzero`` over a bool mask (both materialise an ``[n, d_sae]`` int64 tensor on CPU).
    """
    n = codes.shape[0]
    rows, cols = codes.nonzero(as_tuple=True)  # row-major: rows ascending, columns ascending within a row
    starts = torch.searchsorted(rows, torch.arange(n + 1, device=codes.device))  # [n + 1]
    counts = starts[1:] - starts[:-1]
    m = int(counts.max()) if n else 0
    slot = torch.arange(rows.shape[0], device=codes.device) - starts[:-1][rows]
    indices = torch.zeros((n, m), dtype=torch.long, device=codes.device)
    indices[rows, slot] = cols
    values = codes.new_zeros((n, m)).index_put((rows, slot), codes[rows, cols])
    return indices, values


def pad_cat(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Concatenate per-chunk ``[n_i, m_i]`` codes, padding every chunk to the largest ``m``."""
    if len(parts) == 1:
        return parts[0]
    m = max(idx.shape[1] for idx, _ in parts)
    padded = [(F.pad(idx, (0, m - idx.shape[1])), F.pad(val, (0, m - val.shape[1]))) for idx, val in parts]
    return torch.cat([p[0] for p in padded]), torch.cat([p[1] for p in padded])
