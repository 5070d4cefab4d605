"""The SAE's configuration: everything about an SAE except its tensors, and the shapes it implies."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from darkmatter.errors import ConfigError, SAEFormatError

ACTIVATIONS: tuple[str, ...] = ("relu", "jumprelu", "topk", "batchtopk")
NORMALIZATIONS: tuple[str, ...] = ("none", "layer_norm", "constant_norm_rescale")
THRESHOLD_ACTIVATIONS: tuple[str, ...] = ("jumprelu", "batchtopk")

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """Turn ``"bf16"``, ``"torch.float32"``, ... into a floating torch dtype (``None`` stays ``None``)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = value.strip().lower().removeprefix("torch.")
    if name not in _DTYPE_NAMES:
        raise ConfigError(f"Unknown dtype {value!r}; use one of float32, bfloat16, float16, float64.")
    return _DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass
class SAEConfig:
    """Everything about an SAE except its tensors."""

    d_in: int
    """Width of the activations the SAE reads."""
    d_sae: int
    """Number of latents."""
    activation: str = "relu"
    """One of ``relu``, ``jumprelu``, ``topk``, ``batchtopk`` (inference: a per-latent threshold)."""
    k: int | None = None
    """Latents kept per token (topk); the training k for batchtopk (informational)."""
    apply_b_dec_to_input: bool = True
    """Subtract ``b_dec`` from the (normalized, scaled) input before encoding."""
    input_scale: float = 1.0
    """Scalar the input is multiplied by before encoding; the decoder output is divided by it."""
    normalize: str = "none"
    """Per-token input normalization: ``none``, ``layer_norm`` (OpenAI) or ``constant_norm_rescale``."""
    hook_site: str | None = None
    """Canonical (TransformerLens-style) site, e.g. ``blocks.12.hook_resid_post``, when known."""
    model_name: str | None = None
    """The model the SAE was trained on, when known."""
    source_format: str = "darkmatter"
    """The on-disk format the SAE was loaded from."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Anything else worth keeping (format specifics, path-derived facts); JSON-serializable."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise SAEFormatError when fields are out of range or contradict each other."""
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SAEFormatError(f"SAE config: {name} must be a positive integer, got {value!r}.")
        if self.activation not in ACTIVATIONS:
            raise SAEFormatError(
                f"SAE config: unknown activation {self.activation!r}; "
                f"expected one of {', '.join(ACTIVATIONS)}."
            )
        if self.normalize not in NORMALIZATIONS:
            raise SAEFormatError(
                f"SAE config: unknown normalize {self.normalize!r}; "
                f"expected one of {', '.join(NORMALIZATIONS)}."
            )
        self._check_k()
        for name in ("hook_site", "model_name", "source_format"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise SAEFormatError(f"SAE config: {name} must be a string, got {type(value).__name__}.")
        scale = self.input_scale
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not math.isfinite(scale)
            or scale <= 0
        ):
            raise SAEFormatError(f"SAE config: input_scale must be a finite positive number, got {scale!r}.")

    def _check_k(self) -> None:
        if self.activation == "topk" and self.k is None:
            raise SAEFormatError("SAE config: activation 'topk' needs k (latents kept per token).")
        if self.activation in ("relu", "jumprelu") and self.k is not None:
            raise SAEFormatError(f"SAE config: k={self.k} makes no sense for activation {self.activation!r}.")
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0):
            raise SAEFormatError(f"SAE config: k must be a positive integer, got {self.k!r}.")
        if self.activation == "topk" and self.k is not None and self.k > self.d_sae:
            raise SAEFormatError(f"SAE config: k={self.k} exceeds d_sae={self.d_sae}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SAEConfig:
        """Inverse of ``to_dict``; unknown or missing keys are SAEFormatErrors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SAEFormatError(f"SAE config: unknown keys {unknown}; known keys are {sorted(names)}.")
        missing = sorted(n for n in ("d_in", "d_sae") if n not in data)
        if missing:
            raise SAEFormatError(f"SAE config: missing required keys {missing}.")
        return cls(**copy.deepcopy(dict(data)))


def expected_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Canonical tensor names -> shapes implied by ``cfg``."""
    shapes: dict[str, tuple[int, ...]] = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.activation in THRESHOLD_ACTIVATIONS:
        shapes["threshold"] = (cfg.d_sae,)
    return shapes
