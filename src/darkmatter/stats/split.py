"""Deterministic train/test split of tokens by a seeded hash of (context id, position).

The hash is splitmix64's finaliser chained over (seed, context id, position). torch has no uint64 and
signed int64 overflow is not something to rely on across backends, so each 64-bit value is held as two
32-bit limbs in int64 tensors and multiplied through 16-bit pieces: no intermediate exceeds 2⁵⁰, so the
result is bit-identical on every platform and device: every step, SAE and rerun sees the same split.

``Split`` is the object the steps and experiments share; ``is_train`` is the function behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from darkmatter.errors import ConfigError, DataError, ShapeError

Tensor = torch.Tensor

_M16 = 0xFFFF
_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF
_GAMMA = 0x9E3779B97F4A7C15
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB

_Limbs = tuple[Tensor, Tensor]  # (hi, lo), each in [0, 2³²)


def _add_const(v: _Limbs, c: int) -> _Limbs:
    hi, lo = v
    lo = lo + (c & _M32)
    hi = (hi + (c >> 32) + (lo >> 32)) & _M32
    return hi, lo & _M32


def _xor_shift_right(v: _Limbs, s: int) -> _Limbs:
    """v ^ (v >> s) for 0 < s < 32."""
    hi, lo = v
    lo_shift = ((lo >> s) | (hi << (32 - s))) & _M32
    return hi ^ (hi >> s), lo ^ lo_shift


def _mul_lo32(a: Tensor, c: int) -> Tensor:
    """(a·c) mod 2³² for a in [0, 2³²) and a 32-bit constant c, via 16-bit pieces of a."""
    return ((a & _M16) * c + (((a >> 16) * c) & _M16) * 65536) & _M32


def _mul_const(v: _Limbs, c: int) -> _Limbs:
    """(v·c) mod 2⁶⁴ for a 64-bit constant c."""
    hi, lo = v
    c_hi, c_lo = c >> 32, c & _M32
    p0 = (lo & _M16) * c_lo  # < 2⁴⁸
    p1 = (lo >> 16) * c_lo  # < 2⁴⁸; lo·c_lo = p0 + p1·2¹⁶
    t = p0 + ((p1 & _M16) << 16)
    res_lo = t & _M32
    carry = (t >> 32) + (p1 >> 16)  # the high 32 bits of lo·c_lo
    res_hi = (carry + _mul_lo32(hi, c_lo) + _mul_lo32(lo, c_hi)) & _M32
    return res_hi, res_lo


def _mix(v: _Limbs) -> _Limbs:
    """splitmix64 output for state v: finaliser of v + γ."""
    v = _add_const(v, _GAMMA)
    v = _mul_const(_xor_shift_right(v, 30), _MUL1)
    v = _mul_const(_xor_shift_right(v, 27), _MUL2)
    return _xor_shift_right(v, 31)


def _mix_int(x: int) -> int:
    """Pure-integer splitmix64 output, used for the scalar seed."""
    z = (x + _GAMMA) & _M64
    z = ((z ^ (z >> 30)) * _MUL1) & _M64
    z = ((z ^ (z >> 27)) * _MUL2) & _M64
    return z ^ (z >> 31)


def _limbs(t: Tensor) -> _Limbs:
    return t >> 32, t & _M32


def _check_ids(context_ids: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    for name, t in (("context_ids", context_ids), ("positions", positions)):
        if not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            found = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise DataError(f"is_train: {name} must be an integer tensor, found {found}")
    if context_ids.shape != positions.shape:
        raise ShapeError(
            f"is_train: context_ids {list(context_ids.shape)} and positions {list(positions.shape)} differ"
        )
    c, p = context_ids.to(torch.int64), positions.to(torch.int64)
    if c.numel() and (bool((c < 0).any()) or bool((p < 0).any())):
        raise DataError("is_train: context ids and positions must be >= 0")
    return c, p


def token_hash(context_ids: Tensor, positions: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """64-bit hash of each (context id, position) under `seed`, as (hi, lo) 32-bit halves in int64 tensors.

    h = mix(mix(mix(seed) ^ context_id) ^ position) with mix the splitmix64 output function; `seed` is read
    modulo 2⁶⁴. Each stage is a bijection, so distinct tokens of one context never collide.
    """
    c, p = _check_ids(context_ids, positions)
    s = _mix_int(int(seed) & _M64)
    hi, lo = _limbs(c)
    v = _mix((hi ^ (s >> 32), lo ^ (s & _M32)))
    hi, lo = _limbs(p)
    return _mix((v[0] ^ hi, v[1] ^ lo))


def is_train(context_ids: Tensor, positions: Tensor, seed: int, train_fraction: float) -> Tensor:
    """Bool tensor (shape of the inputs): True for tokens in the train split.

    A token is train when the top 53 bits of `token_hash` are below train_fraction·2⁵³: an exact integer
    comparison, so the split is the same for every experiment, SAE, device and rerun with the same seed.
    """
    if not 0.0 <= train_fraction <= 1.0:
        raise ConfigError(f"is_train: train_fraction must be in [0, 1], found {train_fraction}")
    hi, lo = token_hash(context_ids, positions, seed)
    top53 = (hi << 21) | (lo >> 11)
    return top53 < round(train_fraction * 2**53)


@dataclass(frozen=True)
class Split:
    """The study's train/test split of tokens: ``seed`` and the ``fraction`` of tokens that train.

    Built once from the config and handed to every step and experiment, so no caller re-derives it.
    """

    seed: int = 0
    fraction: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"Split: the train fraction must be in (0, 1), found {self.fraction}")

    def mask(self, context: Tensor, position: Tensor) -> Tensor:
        """Bool [n] on the device of ``context``: True for train tokens."""
        return is_train(context, position, self.seed, self.fraction)

    def train_first(self, context: Tensor, position: Tensor) -> tuple[Tensor, int]:
        """A stable row order with the train tokens first, and how many there are.

        ``rows[order][:n_train]`` are the train rows and ``rows[order][n_train:]`` the test rows, each in
        their original order: every split is then a view, with no masked copies.
        """
        train = self.mask(context, position)
        order = torch.argsort((~train).to(torch.uint8), stable=True)
        return order, int(train.sum())
