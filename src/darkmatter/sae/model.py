"""The canonical SAE that every format converts into (its configuration is in `config`, codes in `codes`).

Conventions (one canonical SAE; every format converts into it on load and out of it on save):

- weights: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, and for
  JumpReLU / BatchTopK a per-latent ``threshold [d_sae]``;
- input transform, in this order: per-token ``normalize`` (``layer_norm``: ``(x - mean) / (std + eps)``;
  ``constant_norm_rescale``: ``x * sqrt(d_in) / ||x||``), then ``* input_scale``, then ``- b_dec`` when
  ``apply_b_dec_to_input``;
- ``pre = x' @ W_enc + b_enc``; codes: ``relu(pre)`` (relu), ``relu(pre) * (pre > threshold)`` (jumprelu and
  batchtopk at inference, SAELens semantics), ``relu`` of the ``k`` largest pre-activations (topk);
- ``x_hat = (codes @ W_dec + b_dec) / input_scale``, then the per-token normalization is undone.

Everything runs in the SAE's dtype and on its device; inputs are cast to them and outputs come back in them.
Loaded SAEs are frozen (``requires_grad=False``); call ``sae.requires_grad_(True)`` to fine-tune one.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from darkmatter.errors import ConfigError, DataError, SAEFormatError, ShapeError
from darkmatter.sae.codes import SparseCodes, pack_dense, pad_cat
from darkmatter.sae.config import (
    ACTIVATIONS,
    NORMALIZATIONS,
    THRESHOLD_ACTIVATIONS,
    SAEConfig,
    dtype_name,
    expected_shapes,
    parse_dtype,
)
from darkmatter.sae.topk import topk

__all__ = [
    "ACTIVATIONS",
    "LAYER_NORM_EPS",
    "NORMALIZATIONS",
    "SAE",
    "THRESHOLD_ACTIVATIONS",
    "InputStats",
    "SAEConfig",
    "SparseCodes",
    "count_nonfinite",
    "dtype_name",
    "expected_shapes",
    "parse_dtype",
]

LAYER_NORM_EPS = 1e-5  # OpenAI sparse_autoencoder and SAELens use 1e-5 with the unbiased std
_NORM_FLOOR = 1e-12  # keeps constant_norm_rescale finite on an all-zero token


@dataclass(frozen=True)
class InputStats:
    """Per-token statistics of a norm-based transform.

    ``x_n = (x - shift) / scale`` on the way in, ``x_hat = y * out_scale + shift`` on the way out. For
    ``layer_norm``, ``scale = std + eps`` but ``out_scale = std``: OpenAI and SAELens undo it without eps.
    """

    shift: Tensor  # [n, 1]
    scale: Tensor  # [n, 1]
    out_scale: Tensor  # [n, 1]


class SAE(nn.Module):
    """A sparse autoencoder in canonical form (see the module docstring for the exact equations)."""

    W_enc: nn.Parameter
    b_enc: nn.Parameter
    W_dec: nn.Parameter
    b_dec: nn.Parameter
    threshold: nn.Parameter | None

    def __init__(self, cfg: SAEConfig, *, dtype: torch.dtype = torch.float32, device: Any = None) -> None:
        """A zero-initialised SAE (trainers fill it; loaders use ``from_tensors``)."""
        super().__init__()
        cfg.check()
        self.cfg = cfg
        for name, shape in expected_shapes(cfg).items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device)))
        if "threshold" not in expected_shapes(cfg):
            self.register_parameter("threshold", None)

    @classmethod
    def from_tensors(
        cls,
        cfg: SAEConfig,
        tensors: Mapping[str, Tensor],
        *,
        dtype: torch.dtype | None = None,
        device: Any = None,
        validate: bool = True,
    ) -> SAE:
        """Wrap canonical tensors (no copy when dtype and device already match); the result is frozen."""
        expected = expected_shapes(cfg)
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise SAEFormatError(f"Missing tensors {missing} for a {cfg.activation} SAE.")
        target = dtype or tensors["W_enc"].dtype
        if not target.is_floating_point:
            raise SAEFormatError(f"SAE tensors must be floating point, got {target}.")
        sae = cls.__new__(cls)
        nn.Module.__init__(sae)
        sae.cfg = cfg
        for name in expected:
            value = tensors[name].detach().to(device=device, dtype=target)
            if name in ("W_enc", "W_dec"):
                value = value.contiguous()  # W_dec rows are gathered by decode_sparse
            sae.register_parameter(name, nn.Parameter(value, requires_grad=False))
        if "threshold" not in expected:
            sae.register_parameter("threshold", None)
        if validate:
            sae.validate()
        return sae

    # ------------------------------------------------------------------ properties and checks

    @property
    def dtype(self) -> torch.dtype:
        """The dtype all computation runs in."""
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        """The device all computation runs on."""
        return self.W_enc.device

    def extra_repr(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        return f"d_in={c.d_in}, d_sae={c.d_sae}, activation={c.activation}{k}, hook_site={c.hook_site}"

    def named_tensors(self) -> Iterator[tuple[str, Tensor]]:
        """The canonical tensors present in this SAE."""
        for name in expected_shapes(self.cfg):
            yield name, getattr(self, name)

    def validate(self) -> None:
        """Check shapes against the config (SAEFormatError) and that every value is finite (DataError)."""
        self.cfg.check()
        expected = expected_shapes(self.cfg)
        for name, shape in expected.items():
            tensor = getattr(self, name, None)
            if tensor is None:
                raise SAEFormatError(f"Tensor {name} is missing; a {self.cfg.activation} SAE needs it.")
            if tuple(tensor.shape) != shape:
                raise SAEFormatError(
                    f"Tensor {name} has shape {tuple(tensor.shape)}, but the config (d_in={self.cfg.d_in}, "
                    f"d_sae={self.cfg.d_sae}) requires {shape}."
                )
            if not tensor.dtype.is_floating_point:
                raise SAEFormatError(f"Tensor {name} has dtype {tensor.dtype}; expected a floating dtype.")
        if "threshold" not in expected and self.threshold is not None:
            raise SAEFormatError(f"A {self.cfg.activation} SAE has no threshold, but one is set.")
        self._check_input_scale()
        for name, tensor in self.named_tensors():
            bad = count_nonfinite(tensor)
            if bad:
                raise DataError(
                    f"Tensor {name} ({dtype_name(tensor.dtype)}) has {bad} NaN or infinite values out of "
                    f"{tensor.numel()}; the SAE file is damaged or overflowed when cast to a smaller dtype."
                )

    def _check_input_scale(self) -> None:
        """``input_scale`` and its inverse must be finite and non-zero in the SAE's dtype (DataError)."""
        scale = self.cfg.input_scale
        both = torch.tensor([scale, 1.0 / scale], dtype=torch.float64).to(self.dtype)
        if not bool(torch.isfinite(both).all()) or bool((both == 0).any()):
            raise DataError(
                f"input_scale={scale:.6g} over- or underflows in {dtype_name(self.dtype)}; the SAE's "
                f"scaling (an average activation norm or norm factor) is damaged or implausible."
            )

    def check_input_width(self, d: int, site: str) -> None:
        """Raise ShapeError unless activations of width ``d`` at ``site`` fit this SAE."""
        if d == self.cfg.d_in:
            return
        trained = self.cfg.hook_site or "an unknown site"
        model = f" of {self.cfg.model_name}" if self.cfg.model_name else ""
        raise ShapeError(
            f"The SAE reads activations of width d_in={self.cfg.d_in} (trained on {trained}{model}), but "
            f"site {site!r} has width {d}. Use an SAE trained for this model and site, or pick the site "
            f"the SAE was trained on."
        )

    # ------------------------------------------------------------------ input and output transforms

    def _flatten(self, x: Tensor, width: int, what: str) -> tuple[Tensor, tuple[int, ...]]:
        if x.ndim == 0 or x.shape[-1] != width:
            raise ShapeError(
                f"{what} must have last dimension {width}, got shape {tuple(x.shape)}"
                + (f" (SAE trained on {self.cfg.hook_site})." if self.cfg.hook_site else ".")
            )
        lead = tuple(x.shape[:-1])
        return x.reshape(-1, width).to(device=self.device, dtype=self.dtype), lead

    def input_stats(self, x: Tensor) -> InputStats | None:
        """Per-token normalization statistics of ``x [..., d_in]`` (None when ``normalize == "none"``)."""
        if self.cfg.normalize == "none":
            return None
        x2d, _ = self._flatten(x, self.cfg.d_in, "SAE input")
        return self._stats(x2d)

    def _stats(self, x2d: Tensor) -> InputStats | None:
        if self.cfg.normalize == "none":
            return None
        # statistics in at least float32, then cast: half-precision means and norms are too coarse
        xf = x2d if x2d.dtype in (torch.float32, torch.float64) else x2d.float()
        if self.cfg.normalize == "layer_norm":
            shift = xf.mean(dim=-1, keepdim=True)
            out_scale = (xf - shift).std(dim=-1, keepdim=True) if xf.shape[0] else xf.new_zeros((0, 1))
            scale = out_scale + LAYER_NORM_EPS
        else:  # constant_norm_rescale
            shift = torch.zeros_like(xf[:, :1])
            scale = out_scale = xf.norm(dim=-1, keepdim=True).clamp_min(_NORM_FLOOR) / math.sqrt(
                self.cfg.d_in
            )
        cast = [t.to(self.dtype) for t in (shift, scale, out_scale)]
        return InputStats(shift=cast[0], scale=cast[1], out_scale=cast[2])

    def _transform_in(self, x2d: Tensor, stats: InputStats | None) -> Tensor:
        if stats is not None:
            x2d = (x2d - stats.shift) / stats.scale
        if self.cfg.input_scale != 1.0:
            x2d = x2d * self.cfg.input_scale
        if self.cfg.apply_b_dec_to_input:
            x2d = x2d - self.b_dec
        return x2d

    def _transform_out(self, y2d: Tensor, stats: InputStats | None) -> Tensor:
        if self.cfg.input_scale != 1.0:
            y2d = y2d / self.cfg.input_scale
        if self.cfg.normalize != "none":
            if stats is None:
                raise ConfigError(
                    f"This SAE normalizes each token ({self.cfg.normalize}), so decoding needs the input's "
                    f"statistics: pass stats=sae.input_stats(x), or use sae(x) / sae.reconstruct(x)."
                )
            y2d = y2d * stats.out_scale + stats.shift
        return y2d

    # ------------------------------------------------------------------ encoding

    def _activate(self, pre: Tensor) -> Tensor:
        """Dense codes from pre-activations ``[n, d_sae]``; reuses ``pre``'s memory when autograd allows."""
        inplace = not pre.requires_grad
        act = self.cfg.activation
        if act == "relu":
            return pre.relu_() if inplace else pre.relu()
        if act in THRESHOLD_ACTIVATIONS:
            below = pre <= self._threshold  # [n, d_sae] bool; masked_fill_ avoids a float copy of the mask
            return pre.masked_fill_(below, 0.0).relu_() if inplace else pre.relu().masked_fill(below, 0.0)
        values, indices = topk(pre, self._k)
        out = pre.zero_() if inplace else torch.zeros_like(pre)
        return out.scatter_(-1, indices, values.relu())

    @property
    def _threshold(self) -> Tensor:
        assert self.threshold is not None  # guaranteed by validate() for threshold activations
        return self.threshold

    @property
    def _k(self) -> int:
        assert self.cfg.k is not None  # guaranteed by SAEConfig.check for topk
        return self.cfg.k

    def _sparse_chunk(self, pre: Tensor) -> tuple[Tensor, Tensor]:
        """``(indices, values) [n, m]`` from pre-activations ``[n, d_sae]`` (the only wide tensor alive)."""
        if self.cfg.activation != "topk":
            return pack_dense(self._activate(pre))
        values, indices = topk(pre, self._k)
        values = values.relu()
        return indices.masked_fill(values == 0, 0), values

    def _chunks(self, n: int, chunk_size: int | None) -> list[tuple[int, int]]:
        if chunk_size is not None and chunk_size <= 0:
            raise ConfigError(f"chunk_size must be a positive number of tokens, got {chunk_size}.")
        if n == 0:
            return [(0, 0)]
        step = n if chunk_size is None else min(chunk_size, n)
        return [(i, min(i + step, n)) for i in range(0, n, step)]

    def pre_activations(self, x: Tensor) -> Tensor:
        """``x' @ W_enc + b_enc`` for ``x [..., d_in]`` -> ``[..., d_sae]``."""
        x2d, lead = self._flatten(x, self.cfg.d_in, "SAE input")
        return self._pre(x2d).reshape(*lead, self.cfg.d_sae)

    def encode(self, x: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """Dense codes ``[..., d_sae]`` for ``x [..., d_in]``."""
        x2d, lead = self._flatten(x, self.cfg.d_in, "SAE input")
        spans = self._chunks(x2d.shape[0], chunk_size)
        if len(spans) <= 1:
            codes = self._activate(self._pre(x2d))
        else:
            codes = x2d.new_empty((x2d.shape[0], self.cfg.d_sae))
            for i, j in spans:
                codes[i:j] = self._activate(self._pre(x2d[i:j]))
        return codes.reshape(*lead, self.cfg.d_sae)

    def _pre(self, x2d: Tensor) -> Tensor:
        """Pre-activations ``[n, d_sae]`` of flattened inputs ``[n, d_in]``."""
        stats = self._stats(x2d)
        if stats is None:
            # (s·x − b_dec)W + b_enc as s·(xW) + (b_enc − b_dec·W): no [n, d_in] copy of the input
            bias: Tensor = self.b_enc
            if self.cfg.apply_b_dec_to_input:
                bias = torch.addmm(self.b_enc, self.b_dec[None], self.W_enc.contiguous(), alpha=-1.0)[0]
            return torch.addmm(bias, x2d, self.W_enc, alpha=self.cfg.input_scale)
        return torch.addmm(self.b_enc, self._transform_in(x2d, stats), self.W_enc)

    def encode_sparse(self, x: Tensor, *, chunk_size: int | None = None) -> SparseCodes:
        """Active latents of ``x [..., d_in]`` as ``SparseCodes`` ``[..., m]``.

        Peak memory is one ``[chunk, d_sae]`` pre-activation tensor (plus a bool mask for threshold
        activations); set ``chunk_size`` (tokens) to bound it for very wide SAEs.
        """
        x2d, lead = self._flatten(x, self.cfg.d_in, "SAE input")
        parts = [self._sparse_chunk(self._pre(x2d[i:j])) for i, j in self._chunks(x2d.shape[0], chunk_size)]
        indices, values = pad_cat(parts)
        m = indices.shape[-1]
        return SparseCodes(indices=indices.reshape(*lead, m), values=values.reshape(*lead, m))

    # ------------------------------------------------------------------ decoding

    def decode(self, codes: Tensor, *, stats: InputStats | None = None) -> Tensor:
        """Reconstruction ``[..., d_in]`` from dense codes ``[..., d_sae]``."""
        f2d, lead = self._flatten(codes, self.cfg.d_sae, "SAE codes")
        y2d = torch.addmm(self.b_dec, f2d, self.W_dec)
        return self._transform_out(y2d, stats).reshape(*lead, self.cfg.d_in)

    def decode_sparse(self, codes: SparseCodes, *, stats: InputStats | None = None) -> Tensor:
        """Reconstruction from sparse codes: a weighted gather of ``W_dec`` rows, no ``[n, d_sae]`` tensor."""
        m = codes.width
        lead = tuple(codes.indices.shape[:-1])
        n = math.prod(lead)
        idx2d = codes.indices.reshape(n, m).to(device=self.device, dtype=torch.long)
        val2d = codes.values.reshape(n, m).to(device=self.device, dtype=self.dtype)
        if m == 0:
            y2d = self.b_dec.expand(idx2d.shape[0], -1).clone()
        else:
            y2d = F.embedding_bag(idx2d, self.W_dec, per_sample_weights=val2d, mode="sum") + self.b_dec
        return self._transform_out(y2d, stats).reshape(*lead, self.cfg.d_in)

    # ------------------------------------------------------------------ full passes

    def reconstruct(self, x: Tensor, *, chunk_size: int | None = None) -> tuple[Tensor, SparseCodes]:
        """``(x_hat [..., d_in], codes)`` in one pass (sparse encode, gather decode)."""
        stats = self.input_stats(x)
        codes = self.encode_sparse(x, chunk_size=chunk_size)
        return self.decode_sparse(codes, stats=stats), codes

    def forward(self, x: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """Reconstruction ``x_hat [..., d_in]`` of ``x [..., d_in]``."""
        return self.reconstruct(x, chunk_size=chunk_size)[0]

    # ------------------------------------------------------------------ equivalent rewrites and summaries

    @torch.no_grad()
    def fold_input_scale(self) -> SAE:
        """An equivalent SAE with ``input_scale == 1``: ``W_enc * s``, ``b_dec / s``, ``W_dec / s``."""
        s = self.cfg.input_scale
        cfg = dataclasses.replace(self.cfg, input_scale=1.0, metadata=copy.deepcopy(self.cfg.metadata))
        tensors = dict(self.named_tensors())
        if s != 1.0:
            tensors["W_enc"] = self.W_enc * s
            tensors["b_dec"] = self.b_dec / s
            tensors["W_dec"] = self.W_dec / s
        return SAE.from_tensors(cfg, {k: v.clone() for k, v in tensors.items()}, validate=False)

    @torch.no_grad()
    def summary(self) -> dict[str, Any]:
        """What ``darkmatter sae inspect`` prints: format, architecture, widths, site, scaling, dtype."""
        c = self.cfg
        return {
            "format": c.source_format,
            "architecture": c.activation,
            "d_in": c.d_in,
            "d_sae": c.d_sae,
            "k": c.k,
            "threshold": _spread(self.threshold) if self.threshold is not None else None,
            "hook_site": c.hook_site,
            "model_name": c.model_name,
            "input_scale": c.input_scale,
            "normalize": c.normalize,
            "apply_b_dec_to_input": c.apply_b_dec_to_input,
            "decoder_norm": _spread(self.W_dec.norm(dim=-1)),
            "dtype": dtype_name(self.dtype),
            "device": str(self.device),
            "metadata": c.metadata,
        }


def count_nonfinite(tensor: Tensor, block_elems: int = 1 << 24) -> int:
    """Number of NaN/inf entries, checked in blocks so a 1M-latent matrix needs no full-size bool copy."""
    flat = tensor.detach().reshape(-1)
    return sum(
        int((~torch.isfinite(flat[i : i + block_elems])).sum()) for i in range(0, flat.numel(), block_elems)
    )


def _spread(values: Tensor) -> dict[str, float]:
    v = values.detach().float().reshape(-1)
    return {"min": float(v.min()), "median": float(v.median()), "max": float(v.max())}
