"""Streaming reconstruction metrics: objects with `update(...)`, `compute()`, `merge()`, `all_reduce_()`.

Each metric keeps float64 sums (int64 for counts) on the device of its first chunk, so evaluating a stream
in any chunking, merged in any order or across ranks, gives the batch answer up to summation order.
Names follow the README's "Metrics": `name` is the key under which results report the value.
Metrics with a centring mean (`fvu`, `r2`) use the first-chunk shift of `moments.py` against cancellation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch

from darkmatter.errors import DataError, ShapeError
from darkmatter.stats.checks import as_rows, raise_nonfinite
from darkmatter.stats.distributed import all_reduce_sum_, common_reference, dist_active, dist_device

Tensor = torch.Tensor
F64 = torch.float64

__all__ = ["FVU", "L0", "NMSE", "Cosine", "ExplainedVariance", "NormRatio", "ScalarR2", "StreamingMetric"]


class StreamingMetric:
    """Base: a flat dict of sums with `merge` = addition; subclasses define `update` and `compute`."""

    name: ClassVar[str]

    def __init__(self, d: int, *, device: torch.device | str | None = None) -> None:
        if d < 1:
            raise ShapeError(f"{type(self).__name__}: width must be >= 1, found {d}")
        self.d = d
        self._device = torch.device(device) if device is not None else None
        self._state: dict[str, Tensor] | None = None
        self._chunks = 0

    def _zeros(self, device: torch.device) -> dict[str, Tensor]:
        raise NotImplementedError

    def _state_on(self, device: torch.device) -> dict[str, Tensor]:
        if self._state is None:
            self._state = self._zeros(self._device or device)
        return self._state

    @property
    def n(self) -> int:
        """Tokens accumulated."""
        return 0 if self._state is None else int(self._state["n"])

    def compute(self) -> float:
        raise NotImplementedError

    def _require(self) -> dict[str, Tensor]:
        if self._state is None or self.n == 0:
            raise DataError(f"{self.name}: no tokens accumulated yet; call update() with at least one chunk")
        return self._state

    def _check_other(self, other: StreamingMetric) -> None:
        if type(other) is not type(self) or other.d != self.d:
            raise ShapeError(
                f"{type(self).__name__}.merge: expected {type(self).__name__} of width {self.d}, "
                f"found {type(other).__name__} of width {other.d}"
            )

    def merge(self, other: StreamingMetric) -> StreamingMetric:
        """Add another metric's sums (same type and width) into this one; returns self."""
        self._check_other(other)
        if other._state is None or other.n == 0:
            return self
        mine = self._state_on(other._state["n"].device)
        for k, v in other._state.items():
            mine[k] += v.to(mine[k].device)
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """The sums as a flat dict of tensors."""
        return {k: v.clone() for k, v in self._state_on(self._device or torch.device("cpu")).items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        template = self._zeros(torch.device("cpu"))
        if set(state) != set(template) or any(state[k].shape != t.shape for k, t in template.items()):
            raise ShapeError(
                f"{type(self).__name__}.load_state_dict: expected keys/shapes "
                f"{ {k: list(t.shape) for k, t in template.items()} }"
            )
        device = self._device or state["n"].device
        self._state = {k: state[k].to(device=device, dtype=t.dtype, copy=True) for k, t in template.items()}

    def all_reduce_(self, group: object | None = None) -> StreamingMetric:
        """Sum the sums of all ranks in place (no-op unless torch.distributed is initialised)."""
        if dist_active():
            all_reduce_sum_(self._state_on(self._device or dist_device(group)).values(), group)
        return self

    def _pair(self, a: Tensor, b: Tensor, names: tuple[str, str]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Validate two [tokens, d] chunks and return them as float64 on the state's device."""
        self._chunks += 1
        a = as_rows(names[0], a, self.d)
        b = as_rows(names[1], b, self.d, a.shape[0])
        state = self._state_on(a.device)
        device = state["n"].device
        return a.to(device=device, dtype=F64), b.to(device=device, dtype=F64), state

    def _check_finite(self, increments: Mapping[str, Tensor], inputs: Mapping[str, Tensor]) -> None:
        """Raise DataError naming the input when a chunk's increments are not finite (one host sync)."""
        if bool(torch.isfinite(torch.stack([v.reshape(()) for v in increments.values()])).all()):
            return
        for label, t in inputs.items():
            if not bool(torch.isfinite(t).all()):
                raise_nonfinite(f"{self.name}: {label}", t, self._chunks)
        raise DataError(f"{self.name}: chunk {self._chunks} gives a non-finite sum (values overflow float64)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(d={self.d}, n={self.n})"


class _Shifted(StreamingMetric):
    """A metric that also needs Σ(x − x̄)² about the stream's mean, kept shifted by a reference."""

    def _ref_width(self) -> int:
        return self.d

    def _zeros(self, device: torch.device) -> dict[str, Tensor]:
        w = self._ref_width()
        return {
            "n": torch.zeros((), dtype=torch.int64, device=device),
            "ref": torch.zeros(w, dtype=F64, device=device),
            "sum": torch.zeros(w, dtype=F64, device=device),
            "sumsq": torch.zeros(w, dtype=F64, device=device),
            "sse": torch.zeros((), dtype=F64, device=device),
        }

    @staticmethod
    def _rebased(state: Mapping[str, Tensor], ref: Tensor) -> dict[str, Tensor]:
        n = state["n"].to(F64)
        s = state["sum"]
        delta = state["ref"] - ref
        out = dict(state)
        out["ref"] = ref.clone()
        out["sum"] = s + n * delta
        out["sumsq"] = state["sumsq"] + 2 * delta * s + n * delta * delta
        return out

    def _add_centred(self, state: dict[str, Tensor], x: Tensor, sse: Tensor, n: int) -> None:
        """Accumulate x [tokens, w] about the reference (set from this chunk if the stream is empty)."""
        if self.n == 0:
            state["ref"].copy_(x.mean(0))
        xs = x - state["ref"]
        state["sum"] += xs.sum(0)
        state["sumsq"] += (xs * xs).sum(0)
        state["sse"] += sse
        state["n"] += n

    def _ss_tot(self) -> Tensor:
        s = self._require()
        return (s["sumsq"] - s["sum"] ** 2 / s["n"].to(F64)).clamp_min(0).sum()

    def merge(self, other: StreamingMetric) -> StreamingMetric:
        self._check_other(other)
        if other._state is None or other.n == 0:
            return self
        if self._state is None or self.n == 0:
            device = self._device or other._state["n"].device
            self._state = {k: v.to(device=device, copy=True) for k, v in other._state.items()}
            return self
        mine = self._state
        theirs = self._rebased({k: v.to(mine["n"].device) for k, v in other._state.items()}, mine["ref"])
        for k in ("n", "sum", "sumsq", "sse"):
            mine[k] += theirs[k]
        return self

    def all_reduce_(self, group: object | None = None) -> StreamingMetric:
        """Move all ranks to one common reference, then sum (no-op without torch.distributed)."""
        if not dist_active():
            return self
        state = self._state_on(self._device or dist_device(group))
        total, ref = common_reference(self.n, state["ref"], group)
        if total == 0:
            return self
        self._state = self._rebased(state, ref)
        all_reduce_sum_([self._state[k] for k in ("n", "sum", "sumsq", "sse")], group)
        return self


class FVU(_Shifted):
    """`fvu` = Σ_t ‖x − x̂‖² / Σ_t ‖x − x̄‖², x̄ the per-dimension mean over all evaluated tokens."""

    name = "fvu"

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """x, x_hat: [tokens, d]."""
        xf, xh, state = self._pair(x, x_hat, ("x", "x_hat"))
        if xf.shape[0] == 0:
            return
        sse = ((xf - xh) ** 2).sum()
        self._check_finite({"sse": sse, "x": xf.sum()}, {"x": x, "x_hat": x_hat})
        self._add_centred(state, xf, sse, xf.shape[0])

    def compute(self) -> float:
        ss_tot = self._ss_tot()
        if not float(ss_tot) > 0:
            raise DataError(f"{self.name}: x is constant over the {self.n} evaluated tokens; undefined")
        return float(self._require()["sse"] / ss_tot)


class ExplainedVariance(FVU):
    """`explained_variance` = 1 − fvu."""

    name = "explained_variance"

    def compute(self) -> float:
        return 1.0 - super().compute()


class ScalarR2(_Shifted):
    """`r2` of a predicted scalar: 1 − Σ(y − ŷ)² / Σ(y − ȳ)², ȳ the mean over the evaluated tokens."""

    name = "r2"

    def __init__(self, *, device: torch.device | str | None = None) -> None:
        super().__init__(1, device=device)

    def update(self, predicted: Tensor, actual: Tensor) -> None:
        """predicted, actual: [tokens] or [tokens, 1]."""
        pred, act, state = self._pair(predicted, actual, ("predicted", "actual"))
        if act.shape[0] == 0:
            return
        sse = ((act - pred) ** 2).sum()
        self._check_finite({"sse": sse, "actual": act.sum()}, {"predicted": predicted, "actual": actual})
        self._add_centred(state, act, sse, act.shape[0])

    def compute(self) -> float:
        ss_tot = self._ss_tot()
        if self.n < 2 or not float(ss_tot) > 0:
            raise DataError(f"{self.name}: actual values are constant over {self.n} token(s); R² undefined")
        return float(1 - self._require()["sse"] / ss_tot)


class _Mean(StreamingMetric):
    """Mean over tokens of a per-token value."""

    def _zeros(self, device: torch.device) -> dict[str, Tensor]:
        return {
            "n": torch.zeros((), dtype=torch.int64, device=device),
            "total": torch.zeros((), dtype=F64, device=device),
        }

    def _add(self, state: dict[str, Tensor], per_token: Tensor) -> None:
        state["total"] += per_token.sum()
        state["n"] += per_token.shape[0]

    def compute(self) -> float:
        s = self._require()
        return float(s["total"] / s["n"].to(F64))

    def _nonzero_norms(self, sq_norm: Tensor, label: str, what: str) -> None:
        zero = int((sq_norm == 0).sum())
        if zero:
            raise DataError(
                f"{self.name}: {zero} token(s) in chunk {self._chunks} have ‖{label}‖ = 0, so {what} is "
                "undefined; drop those tokens (for example BOS or padding) before evaluating"
            )


class NMSE(_Mean):
    """`nmse` = mean over tokens of ‖x − x̂‖² / ‖x‖² (uncentred; OpenAI's and the paper's normalized MSE)."""

    name = "nmse"

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """x, x_hat: [tokens, d]. A token with ‖x‖ = 0 raises DataError."""
        xf, xh, state = self._pair(x, x_hat, ("x", "x_hat"))
        if xf.shape[0] == 0:
            return
        x_sq = (xf * xf).sum(1)
        ratio = ((xf - xh) ** 2).sum(1) / x_sq
        self._nonzero_norms(x_sq, "x", "the normalised error")
        self._check_finite({"total": ratio.sum()}, {"x": x, "x_hat": x_hat})
        self._add(state, ratio)


class NormRatio(_Mean):
    """`norm_ratio` = mean over tokens of ‖x̂‖ / ‖x‖ (below 1 means shrinkage)."""

    name = "norm_ratio"

    def update(self, x: Tensor, x_hat: Tensor) -> None:
        """x, x_hat: [tokens, d]. A token with ‖x‖ = 0 raises DataError."""
        xf, xh, state = self._pair(x, x_hat, ("x", "x_hat"))
        if xf.shape[0] == 0:
            return
        x_norm = xf.norm(dim=1)
        self._nonzero_norms(x_norm, "x", "the norm ratio")
        ratio = xh.norm(dim=1) / x_norm
        self._check_finite({"total": ratio.sum()}, {"x": x, "x_hat": x_hat})
        self._add(state, ratio)


class Cosine(_Mean):
    """`cosine` = mean over tokens of cos(a, b); a token where either vector is zero counts as cos = 0.

    Those tokens are counted in `zero_norm_tokens` so the convention is visible in results.
    """

    name = "cosine"

    def _zeros(self, device: torch.device) -> dict[str, Tensor]:
        state = super()._zeros(device)
        state["zero_norm"] = torch.zeros((), dtype=torch.int64, device=device)
        return state

    @property
    def zero_norm_tokens(self) -> int:
        return 0 if self._state is None else int(self._state["zero_norm"])

    def update(self, a: Tensor, b: Tensor) -> None:
        """a, b: [tokens, d]."""
        af, bf, state = self._pair(a, b, ("a", "b"))
        if af.shape[0] == 0:
            return
        denom = af.norm(dim=1) * bf.norm(dim=1)
        zero = denom == 0
        cos = (af * bf).sum(1) / torch.where(zero, 1.0, denom)
        self._check_finite({"total": cos.sum()}, {"a": a, "b": b})
        state["zero_norm"] += zero.sum()
        self._add(state, cos)


class L0(StreamingMetric):
    """`l0` = mean number of non-zero latents per token, plus per-latent fire counts for dead latents.

    A latent is dead when it never fired on the evaluated tokens (`dead_fraction`).
    """

    name = "l0"

    def __init__(self, d_sae: int, *, device: torch.device | str | None = None) -> None:
        super().__init__(d_sae, device=device)

    def _zeros(self, device: torch.device) -> dict[str, Tensor]:
        return {
            "n": torch.zeros((), dtype=torch.int64, device=device),
            "active": torch.zeros((), dtype=torch.int64, device=device),
            "fire_counts": torch.zeros(self.d, dtype=torch.int64, device=device),
        }

    def update(self, latents: Tensor) -> None:
        """latents: dense [tokens, d_sae] activations."""
        self._chunks += 1
        latents = as_rows("latents", latents, self.d)
        if latents.shape[0] == 0:
            return
        state = self._state_on(latents.device)
        latents = latents.to(state["n"].device)
        if not bool(torch.isfinite(latents.sum(dtype=F64))):
            raise_nonfinite("l0: latents", latents, self._chunks)
        fired = (latents != 0).sum(0)
        state["fire_counts"] += fired
        state["active"] += fired.sum()
        state["n"] += latents.shape[0]

    def update_sparse(self, indices: Tensor, values: Tensor) -> None:
        """Sparse codes as from a TopK SAE: indices [tokens, k] int, values [tokens, k]; zeros don't count."""
        self._chunks += 1
        if indices.shape != values.shape or indices.ndim != 2:
            raise ShapeError(
                f"l0: indices {list(indices.shape)} and values {list(values.shape)} must both be [tokens, k]"
            )
        if indices.is_floating_point():
            raise DataError(f"l0: indices must be an integer tensor, found {indices.dtype}")
        if indices.shape[0] == 0:
            return
        state = self._state_on(values.device)
        device = state["n"].device
        indices, values = indices.to(device), values.to(device)
        if indices.numel() and (bool((indices < 0).any()) or bool((indices >= self.d).any())):
            raise ShapeError(f"l0: latent indices must lie in [0, {self.d}), found some outside")
        if not bool(torch.isfinite(values.sum(dtype=F64))):
            raise_nonfinite("l0: values", values, self._chunks)
        active = indices[values != 0].to(torch.int64)
        state["fire_counts"] += torch.bincount(active, minlength=self.d)
        state["active"] += active.numel()
        state["n"] += indices.shape[0]

    def compute(self) -> float:
        s = self._require()
        return float(s["active"].to(F64) / s["n"].to(F64))

    @property
    def fire_counts(self) -> Tensor:
        """[d_sae] int64: tokens on which each latent was non-zero."""
        return self._require()["fire_counts"].clone()

    def dead_fraction(self) -> float:
        """Fraction of latents that never fired on the evaluated tokens."""
        return float((self._require()["fire_counts"] == 0).to(F64).mean())
