"""Streaming float64 moments: the sufficient statistics of every linear regression of the study.

For inputs x [n, d_x] and any number of named targets y [n, d_y] a `Moments` keeps, per split, n, Σx and
the Gram Σxxᵀ (one, shared by all targets) and per target Σy, Σy² (per dimension) and Σxyᵀ. Every
linear-regression number of the paper (fit with or without bias, held-out SS_res, the R² variants, FVU with
the prediction added) is a function of these sums, so memory is O(d_x² + d_x·Σd_y) whatever the token
count. The bias column x̃ = [x, 1] needs no storage of its own: its moments are n, Σx and Σy, so one
accumulation serves fits with and without bias. The ridge solve is in `ridge`, the exact held-out
evaluation in `heldout`; both are re-exported here.

Shift. Raw sums of activations with large means cancel badly (Σxxᵀ − n·x̄x̄ᵀ). The first chunk's
per-dimension mean of x and of each target is stored as a reference and every row is accumulated as
x − ref_x, y − ref_y. Centred statistics are shift-invariant, means are ref + Σ(x − ref)/n, and the raw
Gram a fit through the origin needs is rebuilt as Gc + n·x̄x̄ᵀ. `merge` and `all_reduce_` first move partial
sums to a common reference with exact formulas, so no result depends on the reference or the chunking.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from darkmatter.errors import ConfigError, DataError, ShapeError
from darkmatter.stats.checks import as_rows, raise_nonfinite
from darkmatter.stats.distributed import all_reduce_sum_, common_reference, dist_active, dist_device

__all__ = [
    "Moments",
    "all_reduce_sum_",
    "as_rows",
    "common_reference",
    "dist_active",
    "dist_device",
    "raise_nonfinite",
]

Tensor = torch.Tensor
F64 = torch.float64


class Moments:
    """Float64 moments of inputs x [tokens, d_x] shared by named target blocks y [tokens, d_y].

    `update(x, {name: y, ...})` adds one chunk (any float dtype, any device; every declared target must come
    with the same tokens as x). Chunk products are float64 GEMMs. float32 chunk GEMMs with float64
    accumulation were measured and rejected: a bare float32 GEMM is 1.2-1.9x faster on a 2-core CPU but
    end to end (bench/bench_moments.py) there was no gain, and on the property-test data held-out R² from
    float32 moments is off by up to ~1e-4 relative (SS_tot − 2·lin + quad cancels), far outside the 1e-8
    the tests demand. The private `_gemm_dtype` attribute exists only so the bench can measure it.
    """

    def __init__(
        self,
        d_x: int,
        targets: Mapping[str, int] | None = None,
        *,
        device: torch.device | str | None = None,
    ) -> None:
        if d_x < 1:
            raise ConfigError(f"Moments: d_x must be >= 1, found {d_x}")
        dims = dict(targets or {})
        for name, d in dims.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"Moments: target names must be non-empty strings, found {name!r}")
            if d < 1:
                raise ConfigError(f"Moments: target {name!r} must have d_y >= 1, found {d}")
        self._d_x = d_x
        self._dims = dims
        self._device = torch.device(device) if device is not None else None
        self._gemm_dtype: torch.dtype = F64
        self._n = 0
        self._chunks = 0
        self._state: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- bookkeeping

    @property
    def n(self) -> int:
        """Tokens accumulated."""
        return self._n

    @property
    def d_x(self) -> int:
        return self._d_x

    @property
    def target_dims(self) -> dict[str, int]:
        """d_y of each declared target, by name."""
        return dict(self._dims)

    @property
    def device(self) -> torch.device | None:
        """Where the sums live: the constructor's device, else that of the first chunk (None before it)."""
        if self._state is not None:
            return self._state["x.ref"].device
        return self._device

    def _keys(self) -> list[str]:
        keys = ["x.ref", "x.sum", "x.gram"]
        for name in self._dims:
            keys += [f"y.{name}.ref", f"y.{name}.sum", f"y.{name}.sumsq", f"y.{name}.cross"]
        return keys

    @property
    def packed_layout(self) -> dict[str, slice]:
        """Column slices of x and of each target in the packed buffer `update_packed` takes."""
        out = {"x": slice(0, self._d_x)}
        a = self._d_x
        for name, dy in self._dims.items():
            out[name] = slice(a, a + dy)
            a += dy
        return out

    @property
    def packed_width(self) -> int:
        """Columns of the packed buffer: d_x plus every target's d_y."""
        return self._d_x + sum(self._dims.values())

    def _zeros(self, device: torch.device) -> dict[str, Tensor]:
        """Zero sums; targets live in packed tensors (the per-target entries are views into them)."""
        d, width = self._d_x, self.packed_width
        ref = torch.zeros(width, dtype=F64, device=device)
        total = torch.zeros(width, dtype=F64, device=device)
        sumsq = torch.zeros(width - d, dtype=F64, device=device)
        gemm = torch.zeros(d, width, dtype=F64, device=device)  # [Σxxᵀ | Σxyᵀ ...]
        state = {
            "x.ref": ref[:d],
            "x.sum": total[:d],
            "x.gram": gemm[:, :d],
            "_ref": ref,
            "_sum": total,
            "_sumsq": sumsq,
            "_gemm": gemm,
        }
        for name, cols in self.packed_layout.items():
            if name == "x":
                continue
            state[f"y.{name}.ref"] = ref[cols]
            state[f"y.{name}.sum"] = total[cols]
            state[f"y.{name}.sumsq"] = sumsq[cols.start - d : cols.stop - d]
            state[f"y.{name}.cross"] = gemm[:, cols]
        return state

    def _state_on(self, device: torch.device) -> dict[str, Tensor]:
        if self._state is None:
            self._state = self._zeros(self._device or device)
        return self._state

    def _adopt(self, values: Mapping[str, Tensor], device: torch.device) -> None:
        """Replace the sums by ``values`` (per-target keys), keeping the packed storage."""
        state = self._zeros(device)
        for k in self._keys():
            state[k].copy_(values[k])
        self._state = state

    # ----------------------------------------------------------------- streaming

    def update(self, x: Tensor, targets: Mapping[str, Tensor] | None = None) -> None:
        """Add a chunk: x [tokens, d_x] and, for every declared target, y [tokens, d_y] (same tokens)."""
        x = as_rows("x", x, self._d_x)
        given = dict(targets or {})
        if set(given) != set(self._dims):
            self._chunks += 1
            missing = sorted(set(self._dims) - set(given))
            unknown = sorted(set(given) - set(self._dims))
            raise ConfigError(
                f"Moments.update: every declared target must be given with each chunk (they share the Gram); "
                f"missing {missing}, unknown {unknown}"
            )
        n = x.shape[0]
        ys = {name: as_rows(f"target {name!r}", given[name], d, n) for name, d in self._dims.items()}
        device = self.device or x.device
        buf = torch.empty(n, self.packed_width, dtype=F64, device=device)
        for name, cols in self.packed_layout.items():
            buf[:, cols].copy_(x if name == "x" else ys[name])
        self.update_packed(buf)

    @property
    def packed_reference(self) -> Tensor | None:
        """The per-column reference [packed_width] every chunk is shifted by (None before the first chunk).

        A caller that writes ``value − reference`` into the packed buffer itself (one pass, while converting
        to float64) passes ``shifted=True`` to `update_packed`.
        """
        return None if self._state is None or self._n == 0 else self._state["_ref"]

    def update_packed(self, buf: Tensor, *, shifted: bool = False) -> None:
        """Add a chunk given as one float64 buffer [tokens, packed_width]: x, then the targets in declared
        order (see `packed_layout`). The buffer is overwritten (shifted in place) unless ``shifted`` says
        it already holds ``value − packed_reference``. Products are one GEMM for the Gram and every cross
        term."""
        if shifted and self.packed_reference is None:
            raise ConfigError(
                "Moments.update_packed: shifted=True needs a reference (a first, unshifted chunk)."
            )
        self._chunks += 1
        width = self.packed_width
        if buf.ndim != 2 or buf.shape[1] != width or buf.dtype != F64:
            raise ShapeError(
                f"Moments.update_packed: expected a float64 [tokens, {width}] buffer, found "
                f"{buf.dtype} {list(buf.shape)}"
            )
        n = buf.shape[0]
        if n == 0:
            return
        state = self._state_on(buf.device)
        if buf.device != state["_ref"].device:
            buf = buf.to(state["_ref"].device)
        d = self._d_x
        ones = torch.ones(n, dtype=F64, device=buf.device)
        # Column sums both seed the reference and catch NaN/inf with one host sync.
        col = ones @ buf
        if not bool(torch.isfinite(col).all()):
            for name, cols in self.packed_layout.items():
                if not bool(torch.isfinite(col[cols]).all()):
                    label = "x" if name == "x" else f"target {name!r}"
                    raise_nonfinite(label, buf[:, cols], self._chunks)
        if shifted:
            state["_sum"] += col
        else:
            if self._n == 0:
                state["_ref"].copy_(col / n)
            buf.sub_(state["_ref"])
            state["_sum"] += ones @ buf
        if width > d:
            y = buf[:, d:]
            step = max(1, (1 << 20) // (width - d))  # row blocks keep the squares' temporary small
            for a in range(0, n, step):
                blk = y[a : a + step]
                state["_sumsq"] += (blk * blk).sum(0)
        xs = buf[:, :d]
        if self._gemm_dtype == F64:
            state["_gemm"].addmm_(xs.T, buf)
        else:
            state["_gemm"] += (xs.to(self._gemm_dtype).T @ buf.to(self._gemm_dtype)).to(F64)
        self._n += n

    def _rebased(self, state: dict[str, Tensor], n: int, ref: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """`state` (n tokens) re-expressed about the references ref["x"], ref[name]; exact algebra."""
        sx = state["x.sum"]
        dx = state["x.ref"] - ref["x"]  # x − new_ref = (x − old_ref) + dx
        out = {
            "x.ref": ref["x"].clone(),
            "x.sum": sx + n * dx,
            "x.gram": state["x.gram"] + torch.outer(sx, dx) + torch.outer(dx, sx) + n * torch.outer(dx, dx),
        }
        for name in self._dims:
            sy = state[f"y.{name}.sum"]
            dy = state[f"y.{name}.ref"] - ref[name]
            out[f"y.{name}.ref"] = ref[name].clone()
            out[f"y.{name}.sum"] = sy + n * dy
            out[f"y.{name}.sumsq"] = state[f"y.{name}.sumsq"] + 2 * dy * sy + n * dy * dy
            out[f"y.{name}.cross"] = (
                state[f"y.{name}.cross"] + torch.outer(sx, dy) + torch.outer(dx, sy) + n * torch.outer(dx, dy)
            )
        return out

    def _refs(self) -> dict[str, Tensor]:
        assert self._state is not None
        refs = {"x": self._state["x.ref"]}
        refs.update({name: self._state[f"y.{name}.ref"] for name in self._dims})
        return refs

    def _check_compatible(self, other: Moments) -> None:
        if not isinstance(other, Moments):
            raise ShapeError(f"Moments.merge: expected a Moments, found {type(other).__name__}")
        if other._d_x != self._d_x or other._dims != self._dims:
            raise ShapeError(
                f"Moments.merge: layouts differ: d_x {self._d_x} vs {other._d_x}, "
                f"targets {self._dims} vs {other._dims}"
            )

    def merge(self, other: Moments) -> Moments:
        """Add another accumulator's sums (same d_x and targets) into this one; returns self."""
        self._check_compatible(other)
        if other._n == 0 or other._state is None:
            return self
        if self._n == 0 or self._state is None:
            self._adopt(other._state, self.device or other._state["x.ref"].device)
            self._n = other._n
            return self
        device = self._state["x.ref"].device
        theirs = {k: v.to(device) for k, v in other._state.items()}
        theirs = self._rebased(theirs, other._n, self._refs())
        for k in self._keys():
            if not k.endswith(".ref"):
                self._state[k] += theirs[k]
        self._n += other._n
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """The sums as a flat dict of tensors (`n` an int64 scalar), e.g. for checkpoints or collectives."""
        state = self._state_on(self._device or torch.device("cpu"))
        out = {k: state[k].clone() for k in self._keys()}
        out["n"] = torch.tensor(self._n, dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Replace the sums by those of `state_dict()` from an accumulator with the same layout."""
        expected = set(self._keys()) | {"n"}
        if set(state) != expected:
            raise ShapeError(
                f"Moments.load_state_dict: keys differ: missing {sorted(expected - set(state))}, "
                f"unknown {sorted(set(state) - expected)}"
            )
        template = self._zeros(torch.device("cpu"))
        for k in self._keys():
            t = template[k]
            if tuple(state[k].shape) != tuple(t.shape):
                raise ShapeError(
                    f"Moments.load_state_dict: {k} has shape {list(state[k].shape)}, expected {list(t.shape)}"
                )
        device = self._device or state["x.ref"].device
        self._adopt({k: state[k].to(dtype=F64) for k in self._keys()}, device)
        self._n = int(state["n"])

    def all_reduce_(self, group: object | None = None) -> Moments:
        """Sum the partial moments of all ranks in place (no-op unless torch.distributed is initialised).

        Every rank is first moved to one common reference, the token-weighted mean of the ranks'
        references, so the summed shifted moments are consistent; all ranks end with identical sums.
        """
        if not dist_active():
            return self
        state = self._state_on(self._device or dist_device(group))
        refs = self._refs()
        keys = list(refs)
        flat_ref = torch.cat([refs[k] for k in keys])
        total, common = common_reference(self._n, flat_ref, group)
        if total == 0:
            return self
        new_refs: dict[str, Tensor] = {}
        offset = 0
        for k in keys:
            size = refs[k].numel()
            new_refs[k] = common[offset : offset + size]
            offset += size
        self._adopt(self._rebased(state, self._n, new_refs), state["_ref"].device)
        assert self._state is not None
        all_reduce_sum_([self._state[k] for k in ("_sum", "_sumsq", "_gemm")], group)
        self._n = total
        return self

    # ----------------------------------------------------------------- derived statistics

    def _require(self, target: str | None = None) -> dict[str, Tensor]:
        if self._n == 0 or self._state is None:
            raise DataError("Moments: no tokens accumulated yet; call update() with at least one chunk")
        if target is not None and target not in self._dims:
            raise ConfigError(f"Moments: unknown target {target!r}; declared targets: {sorted(self._dims)}")
        return self._state

    def mean_x(self) -> Tensor:
        """x̄ [d_x] over the accumulated tokens."""
        s = self._require()
        return s["x.ref"] + s["x.sum"] / self._n

    def centred_gram(self) -> Tensor:
        """Σ(x − x̄)(x − x̄)ᵀ [d_x, d_x], symmetrised."""
        s = self._require()
        g = s["x.gram"] - torch.outer(s["x.sum"], s["x.sum"]) / self._n
        return (g + g.T) / 2

    def gram(self, bias: bool = False) -> Tensor:
        """Raw Σx̃x̃ᵀ, [d_x, d_x] or with bias [d_x + 1, d_x + 1] (x̃ = [x, 1]); rebuilt from centred sums."""
        m = self.mean_x()
        g = self.centred_gram() + self._n * torch.outer(m, m)
        if not bias:
            return g
        n_col = torch.cat([self._n * m, m.new_tensor([float(self._n)])])
        return torch.cat([torch.cat([g, (self._n * m)[None]], 0), n_col[:, None]], 1)

    def total_variance_x(self) -> float:
        """Σ_t ‖x_t − x̄‖² = trace of the centred Gram: the denominator of FVU for x over these tokens."""
        s = self._require()
        return float((s["x.gram"].diagonal() - s["x.sum"] ** 2 / self._n).clamp_min(0).sum())

    def mean_target(self, target: str) -> Tensor:
        """ȳ [d_y]."""
        s = self._require(target)
        return s[f"y.{target}.ref"] + s[f"y.{target}.sum"] / self._n

    def centred_cross(self, target: str) -> Tensor:
        """Σ(x − x̄)(y − ȳ)ᵀ [d_x, d_y]."""
        s = self._require(target)
        return s[f"y.{target}.cross"] - torch.outer(s["x.sum"], s[f"y.{target}.sum"]) / self._n

    def cross(self, target: str, bias: bool = False) -> Tensor:
        """Raw Σx̃yᵀ, [d_x, d_y] or with bias [d_x + 1, d_y]; rebuilt from centred sums."""
        my = self.mean_target(target)
        c = self.centred_cross(target) + self._n * torch.outer(self.mean_x(), my)
        return torch.cat([c, (self._n * my)[None]], 0) if bias else c

    def target_ss_tot(self, target: str) -> Tensor:
        """Σ(y − ȳ)² [d_y] per output dimension."""
        s = self._require(target)
        sy = s[f"y.{target}.sum"]
        return (s[f"y.{target}.sumsq"] - sy * sy / self._n).clamp_min(0)

    def target_sum_sq(self, target: str) -> Tensor:
        """Σy² [d_y] per output dimension (uncentred)."""
        my = self.mean_target(target)
        return self.target_ss_tot(target) + self._n * my * my

    def __repr__(self) -> str:
        return f"Moments(d_x={self._d_x}, targets={self._dims}, n={self._n}, device={self.device})"
