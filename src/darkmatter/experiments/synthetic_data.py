"""The data of the synthetic decomposition test: x′ sources, seeded noise, ablation masks.

`SAESource` builds x′ = Sae(x) from stored activations; `RandomSource` the App. D control data, sparse
power-law sums of random Gaussian directions. The noise ε₁, ε₂ is drawn chunk by chunk on the CPU from one
seeded generator, so the ``CHUNK`` size is part of the seeded stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from darkmatter.sae.model import SAE, SparseCodes

Tensor = torch.Tensor
F64 = torch.float64
Decode = Callable[[SparseCodes], Tensor]

CHUNK = 4096
"""Tokens per chunk of the pass. The noise is drawn chunk by chunk, so this is part of the seeded stream."""


class SAESource:
    """x′ = Sae(x) from a stored [N, d] tensor, which holds x′ itself when re-encoding and x otherwise."""

    def __init__(self, sae: SAE, enc_in: Tensor, reencode: bool) -> None:
        self.sae, self.enc_in, self.reencode = sae, enc_in, reencode

    def __len__(self) -> int:
        return len(self.enc_in)

    def chunk(self, a: int, b: int) -> tuple[Tensor, SparseCodes, Decode]:
        """(x′ [m, d] float32, the codes that r_0 decodes, the decoder for this chunk's tokens)."""
        inp = self.enc_in[a:b].to(self.sae.device)
        stats = self.sae.input_stats(inp)
        codes = self.sae.encode_sparse(inp)

        def decode(c: SparseCodes) -> Tensor:
            return self.sae.decode_sparse(c, stats=stats).float()

        return (inp.float() if self.reencode else decode(codes)), codes, decode


class RandomSource:
    """App. D data: sparse power-law sums of random Gaussian directions. The decoder is the directions."""

    def __init__(self, directions: Tensor, codes: SparseCodes) -> None:
        self.directions, self.codes = directions, codes
        n = len(codes.indices)
        self.x = torch.cat([self._decode(self._slice(a, a + CHUNK)) for a in range(0, n, CHUNK)])

    def __len__(self) -> int:
        return len(self.x)

    def _slice(self, a: int, b: int) -> SparseCodes:
        return SparseCodes(self.codes.indices[a:b], self.codes.values[a:b])

    def _decode(self, c: SparseCodes) -> Tensor:
        return F.embedding_bag(c.indices, self.directions, per_sample_weights=c.values, mode="sum")

    def chunk(self, a: int, b: int) -> tuple[Tensor, SparseCodes, Decode]:
        return self.x[a:b], self._slice(a, b), self._decode


def random_source(
    n: int, d: int, *, n_directions: int, l0: float, exponent: float, seed: int, device: torch.device
) -> tuple[RandomSource, Tensor]:
    """The control data, and each direction's mass (mean weight × norm over the N tokens)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_directions, d, generator=g) / math.sqrt(d)
    probs = torch.arange(1, n_directions + 1, dtype=F64).pow(-exponent)
    k_max = math.ceil(l0 + 6 * math.sqrt(l0)) + 1
    parts_i, parts_v = [], []
    for a in range(0, n, CHUNK):
        m = min(CHUNK, n - a)
        idx = torch.multinomial(probs, m * k_max, replacement=True, generator=g).view(m, k_max)
        count = torch.poisson(torch.full((m, 1), float(l0), dtype=F64), generator=g)
        keep = torch.arange(k_max)[None, :] < count
        parts_i.append(idx.masked_fill(~keep, 0))
        parts_v.append(((torch.rand(m, k_max, generator=g) + 0.5) * keep).float())
    codes = SparseCodes(torch.cat(parts_i).to(device), torch.cat(parts_v).to(device))
    directions = directions.to(device)
    mass = torch.zeros(n_directions, dtype=F64, device=device)
    mass.index_add_(0, codes.indices.reshape(-1), codes.values.reshape(-1).to(F64))
    return RandomSource(directions, codes), mass / n * directions.norm(dim=1).to(F64)


def chunk_spans(n_train: int, n: int) -> list[tuple[int, int]]:
    """Chunks of at most CHUNK tokens over the train rows [0, n_train), then the test rows [n_train, n)."""
    return [(a, min(a + CHUNK, hi)) for lo, hi in ((0, n_train), (n_train, n)) for a in range(lo, hi, CHUNK)]


def noise_chunks(seed: int, spans: list[tuple[int, int]], d: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(ε₁, ε₂) [b − a, d] float32 per span, drawn in order on the CPU (the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    for a, b in spans:
        yield torch.randn(b - a, d, generator=g), torch.randn(b - a, d, generator=g)


def masked(codes: SparseCodes, keep: Tensor) -> SparseCodes:
    return SparseCodes(codes.indices, codes.values * keep[codes.indices].to(codes.values.dtype))


def keeps(mass: Tensor, ablations: Sequence[float]) -> tuple[list[Tensor], list[int]]:
    """Per ablation fraction p, a bool mask of kept latents: the ⌊n·p⌋ with the least mass are dropped."""
    n = mass.numel()
    order = torch.sort(mass.cpu(), stable=True).indices.to(mass.device)
    keeps, counts = [], []
    for p in ablations:
        k = math.floor(n * p + 1e-9)
        keep = torch.ones(n, dtype=torch.bool, device=mass.device)
        keep[order[:k]] = False
        keeps.append(keep)
        counts.append(k)
    return keeps, counts


def rms_std(x: Tensor) -> float:
    """√(mean over dimensions of the per-dimension variance) of x [N, d], from float64 chunks."""
    ref = x[:CHUNK].to(F64).mean(0)
    s, s2 = torch.zeros_like(ref), torch.zeros_like(ref)
    for a in range(0, len(x), CHUNK):
        c = x[a : a + CHUNK].to(F64) - ref
        s += c.sum(0)
        s2 += (c * c).sum(0)
    n = len(x)
    return math.sqrt(float(((s2 - s * s / n) / n).clamp_min(0).mean()))
