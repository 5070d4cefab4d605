"""Streaming float64 moments, the ridge solve and exact held-out evaluation from moments.

For inputs x [n, d_x] and any number of named targets y [n, d_y] a `Moments` keeps, per split, n, Σx and
the Gram Σxxᵀ (one, shared by all targets) and per target Σy, Σy² (per dimension) and Σxyᵀ. Every
linear-regression number of the paper (fit with or without bias, held-out SS_res, the R² variants, FVU with
the prediction added) is a function of these sums, so memory is O(d_x² + d_x·Σd_y) whatever the token count
(ARCHITECTURE principle 2). The bias column x̃ = [x, 1] needs no storage of its own: its moments are n, Σx
and Σy, so one accumulation serves fits with and without bias.

Shift. Raw sums of activations with large means cancel badly (Σxxᵀ − n·x̄x̄ᵀ). The first chunk's
per-dimension mean of x and of each target is stored as a reference and every row is accumulated as
x − ref_x, y − ref_y. Centred statistics are shift-invariant, means are ref + Σ(x − ref)/n, and the raw
Gram a fit through the origin needs is rebuilt as Gc + n·x̄x̄ᵀ. `merge` and `all_reduce_` first move partial
sums to a common reference with exact formulas, so no result depends on the reference or the chunking.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

from darkmatter.errors import ConfigError, DataError, ShapeError

Tensor = torch.Tensor
F64 = torch.float64

DEFAULT_RELATIVE_RIDGE = 1e-10
"""Default λ as a fraction of the mean diagonal of the centred train Gram (see `fit_ridge`)."""

CONSTANT_TARGET_TOL = 1e-20
"""A target dimension is constant when SS_tot <= this × Σy² on the evaluated tokens.

Float64 round-off on a truly constant column leaves SS_tot around 1e-32·Σy²; a float32 column that varies
by a single ulp has SS_tot/Σy² near 1e-14, so the threshold separates the two by six orders of magnitude."""


# --------------------------------------------------------------------------- shared helpers


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


def dist_active() -> bool:
    """True when torch.distributed is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def dist_device(group: object | None) -> torch.device:
    """The device collectives of `group` need for tensors that have none yet (cuda for nccl, else cpu)."""
    if dist.get_backend(group) == "nccl":  # type: ignore[arg-type]
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: Iterable[Tensor], group: object | None = None) -> None:
    """Sum tensors in place across ranks, with one collective per dtype."""
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)  # type: ignore[arg-type]
        offset = 0
        for t in ts:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def common_reference(n: int, ref: Tensor, group: object | None) -> tuple[int, Tensor]:
    """Total count and token-weighted mean of all ranks' shift references (ranks without data add nothing)."""
    buf = torch.cat([torch.tensor([float(n)], dtype=F64, device=ref.device), n * ref.reshape(-1)])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)  # type: ignore[arg-type]
    total = round(buf[0].item())
    if total == 0:
        return 0, ref.clone()
    return total, (buf[1:] / buf[0]).view_as(ref)


# --------------------------------------------------------------------------- accumulator


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


# --------------------------------------------------------------------------- ridge solve


@dataclass(frozen=True)
class RidgeFit:
    """y ≈ x·weights + bias from minimising ‖x̃B − y‖² + ridge·‖weights‖² on train moments (float64)."""

    weights: Tensor
    """[d_x, d_y] float64."""
    bias: Tensor | None
    """[d_y] float64 intercept (never penalised), or None for a fit through the origin."""
    ridge: float
    """Absolute λ actually used, after any escalation."""
    ridge_scale: float
    """Mean diagonal of the centred train Gram; ridge / ridge_scale is the relative ridge."""
    escalations: int
    """How many times λ was multiplied by 10 because the Cholesky factorisation failed."""
    n_train: int
    """Train tokens the moments came from."""

    @property
    def relative_ridge(self) -> float:
        return self.ridge / self.ridge_scale

    def predict(self, x: Tensor) -> Tensor:
        """ŷ [tokens, d_y] float64 for x [tokens, d_x] on the fit's device."""
        x = as_rows("x", x, self.weights.shape[0]).to(device=self.weights.device, dtype=F64)
        y = x @ self.weights
        return y + self.bias if self.bias is not None else y


def fit_ridge_many(
    moments: Moments,
    targets: Sequence[str] | None = None,
    *,
    bias: bool = True,
    ridge: float | None = None,
    relative_ridge: float = DEFAULT_RELATIVE_RIDGE,
    max_escalations: int = 6,
) -> dict[str, RidgeFit]:
    """Fit every named target (default: all) against the shared Gram with one Cholesky factorisation.

    λ = `ridge` if given, else `relative_ridge` × mean diagonal of the centred Gram, with or without bias
    (the centred scale does not depend on how far x sits from the origin). The default 1e-10 keeps exactly
    rank-deficient inputs solvable for d_x up to ~10⁴ while moving W by at most ~1e-10·cond(Gc) relative.
    If the factorisation fails, λ is multiplied by 10 (or set to the default relative ridge if it was 0)
    up to `max_escalations` times; the λ used is reported in the fit. With bias the problem is solved in
    centred form, W = (Gc + λI)⁻¹Cc, b = ȳ − x̄W, which is the exact minimiser with an unpenalised bias.

    Raises DataError when n_train <= d_x (+1 with bias): such a fit is determined by the ridge, not the data.
    """
    names = list(moments.target_dims) if targets is None else list(targets)
    for name in names:
        if name not in moments.target_dims:
            raise ConfigError(
                f"fit_ridge: unknown target {name!r}; declared targets: {sorted(moments.target_dims)}"
            )
    if ridge is not None and not (math.isfinite(ridge) and ridge >= 0):
        raise ConfigError(f"fit_ridge: ridge must be a finite number >= 0, found {ridge}")
    if not (math.isfinite(relative_ridge) and relative_ridge >= 0):
        raise ConfigError(f"fit_ridge: relative_ridge must be a finite number >= 0, found {relative_ridge}")
    n, d = moments.n, moments.d_x
    n_params = d + int(bias)
    if n <= n_params:
        raise DataError(
            f"fit_ridge: {n} train tokens for {n_params} coefficients per output (d_x={d}"
            f"{' + bias' if bias else ''}); the fit would be set by the ridge, not the data. "
            "Accumulate more train tokens (typically >= 10x d_x)."
        )
    gc = moments.centred_gram()
    scale = float(gc.diagonal().mean())
    if not scale > 0:
        raise DataError(
            f"fit_ridge: every input dimension is constant over the {n} train tokens; nothing to regress on"
        )
    mx = moments.mean_x()
    a = gc if bias else gc + n * torch.outer(mx, mx)
    lam = float(ridge) if ridge is not None else relative_ridge * scale
    eye = torch.eye(d, dtype=F64, device=a.device)
    chol: Tensor | None = None
    escalations = 0
    for attempt in range(max_escalations + 1):
        factor, info = torch.linalg.cholesky_ex(a + lam * eye)
        if int(info) == 0 and bool(torch.isfinite(factor).all()):
            chol, escalations = factor, attempt
            break
        if attempt < max_escalations:
            lam = lam * 10 if lam > 0 else DEFAULT_RELATIVE_RIDGE * scale
    if chol is None:
        raise DataError(
            f"fit_ridge: Cholesky of the train Gram failed even with ridge {lam:.3g} "
            f"({lam / scale:.3g} relative); the inputs are badly scaled or not finite"
        )
    fits: dict[str, RidgeFit] = {}
    for name in names:
        my = moments.mean_target(name)
        rhs = moments.centred_cross(name)
        if not bias:
            rhs = rhs + n * torch.outer(mx, my)
        w = torch.cholesky_solve(rhs, chol)
        b = my - mx @ w if bias else None
        fits[name] = RidgeFit(
            weights=w, bias=b, ridge=lam, ridge_scale=scale, escalations=escalations, n_train=n
        )
    return fits


def fit_ridge(
    moments: Moments,
    target: str,
    *,
    bias: bool = True,
    ridge: float | None = None,
    relative_ridge: float = DEFAULT_RELATIVE_RIDGE,
    max_escalations: int = 6,
) -> RidgeFit:
    """Fit one named target; see `fit_ridge_many` for λ, escalation and the too-few-tokens rule."""
    return fit_ridge_many(
        moments,
        [target],
        bias=bias,
        ridge=ridge,
        relative_ridge=relative_ridge,
        max_escalations=max_escalations,
    )[target]


# --------------------------------------------------------------------------- held-out evaluation


@dataclass(frozen=True)
class HeldOutEval:
    """A fit scored exactly on another split's moments, per output dimension and pooled.

    Constant target dimensions (SS_tot <= CONSTANT_TARGET_TOL·Σy²) have no R²: they get NaN in
    `r2_per_dim`, are left out of `r2_mean_over_dims` and counted in `constant_dims`; their SS_res still
    counts in `r2_variance_weighted` and FVU. If every dimension is constant, `evaluate` raises DataError.
    """

    n_test: int
    ss_res: Tensor
    """[d_y] Σ_t (y − ŷ)² on the test tokens."""
    ss_tot: Tensor
    """[d_y] Σ_t (y − ȳ)², ȳ the test-split mean."""
    sum_sq: Tensor
    """[d_y] Σ_t y² (uncentred). For y = e = x − Sae(x), Σ sum_sq / SS_tot(x) is the SAE's own FVU."""
    r2_per_dim: Tensor
    """[d_y] 1 − ss_res/ss_tot; NaN for constant dimensions."""
    constant_dims: int
    r2_mean_over_dims: float
    """Unweighted mean of per-dimension R² over non-constant dims (the paper's vector-probe R²)."""
    r2_variance_weighted: float
    """1 − Σ ss_res / Σ ss_tot over all dims."""

    @property
    def r2(self) -> float:
        """Ordinary R² of a scalar target (d_y == 1)."""
        if self.ss_res.numel() != 1:
            raise ShapeError(
                f"HeldOutEval.r2 is for a scalar target; this one has d_y={self.ss_res.numel()}: "
                "use r2_mean_over_dims or r2_variance_weighted"
            )
        return float(self.r2_per_dim[0])


def evaluate(fit: RidgeFit, moments: Moments, target: str) -> HeldOutEval:
    """Score `fit` on the tokens behind `moments` (the test split) without revisiting them.

    SS_res = Σy² − 2·diag(BᵀC) + diag(BᵀGB) per output dim, computed in its centred form
    SS_tot − 2·diag(WᵀCc) + diag(WᵀGcW) + n·(ȳ − x̄W − b)², which is the same quantity without the
    cancellation of raw moments. Negative round-off (a near-perfect fit) is clamped to 0.
    """
    dims = moments.target_dims
    if target not in dims:
        raise ConfigError(f"evaluate: unknown target {target!r}; declared targets are {sorted(dims)}")
    n = moments.n
    if n < 2:
        raise DataError(f"evaluate: {n} test token(s); R² about the test mean needs at least 2")
    if tuple(fit.weights.shape) != (moments.d_x, dims[target]):
        raise ShapeError(
            f"evaluate: fit weights have shape {list(fit.weights.shape)}, expected "
            f"[{moments.d_x}, {dims[target]}] for target {target!r}"
        )
    gc = moments.centred_gram()
    device = gc.device
    w = fit.weights.to(device=device, dtype=F64)
    b = fit.bias.to(device=device, dtype=F64) if fit.bias is not None else torch.zeros_like(w[0])
    ss_tot = moments.target_ss_tot(target)
    offset = moments.mean_target(target) - moments.mean_x() @ w - b
    quad = ((gc @ w) * w).sum(0)
    lin = (moments.centred_cross(target) * w).sum(0)
    ss_res = (ss_tot - 2 * lin + quad + n * offset * offset).clamp_min(0)
    sum_sq = moments.target_sum_sq(target)
    constant = ss_tot <= CONSTANT_TARGET_TOL * sum_sq
    n_constant = int(constant.sum())
    if n_constant == ss_tot.numel():
        raise DataError(
            f"evaluate: all {n_constant} dimension(s) of target {target!r} are constant on the {n} test "
            "tokens; R² is undefined"
        )
    r2 = torch.where(constant, torch.nan, 1 - ss_res / torch.where(constant, 1.0, ss_tot))
    return HeldOutEval(
        n_test=n,
        ss_res=ss_res,
        ss_tot=ss_tot,
        sum_sq=sum_sq,
        r2_per_dim=r2,
        constant_dims=n_constant,
        r2_mean_over_dims=float(r2[~constant].mean()),
        r2_variance_weighted=float(1 - ss_res.sum() / ss_tot.sum()),
    )


def fvu_with_prediction(evaluation: HeldOutEval, x_total_variance: float) -> float:
    """FVU(x, Sae(x) + ŷ) on the test tokens, where ŷ predicts the target e = x − Sae(x).

    x − Sae(x) − ŷ = e − ŷ, so the numerator is exactly Σ ss_res; `x_total_variance` is Σ_t ‖x_t − x̄‖²
    over the same test tokens (`Moments.total_variance_x()` of the test split when x is the input).
    """
    if not (math.isfinite(x_total_variance) and x_total_variance > 0):
        raise DataError(
            f"fvu_with_prediction: total variance of x must be finite and > 0, found {x_total_variance}"
        )
    return float(evaluation.ss_res.sum()) / x_total_variance
