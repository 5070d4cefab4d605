"""Checked inputs of the error experiments: the model, held-out contexts, SAEs, probes and stores.

Every check raises the project's typed errors with a message that names the offending SAE or site, so the
experiments themselves can assume well-formed inputs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from darkmatter.errors import ConfigError, DataError, HookSiteError, ShapeError, StoreError
from darkmatter.lm.loading import LoadedLM
from darkmatter.lm.sites import Site, validate_sites
from darkmatter.sae.model import SAE
from darkmatter.store import ActivationStore

Tensor = torch.Tensor

_SITE_ORDER = {"hook_resid_pre": 0, "hook_attn_out": 1, "hook_mlp_out": 2, "hook_resid_post": 3}


def model_of(lm: Any) -> torch.nn.Module:
    """The torch module of a ``LoadedLM`` (or the module itself)."""
    model = lm.model if isinstance(lm, LoadedLM) else lm
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"Expected a LoadedLM or a torch causal LM, found {type(lm).__name__}.")
    return model


def model_identity(lm: Any, model: torch.nn.Module) -> dict[str, Any]:
    """What identifies the model in a result's config (its class name for a bare module)."""
    return lm.identity if isinstance(lm, LoadedLM) else {"name": type(model).__name__}


def model_width(model: torch.nn.Module) -> int:
    """The model's residual width (``hidden_size`` or ``n_embd``)."""
    cfg = model.config  # type: ignore[attr-defined]
    return int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0))


def check_tokens(tokens: Any, model: torch.nn.Module, start: int) -> np.ndarray:
    """Validate held-out contexts ``[n, ctx_len]`` and the splice start; returns an int64 array."""
    arr = tokens.detach().cpu().numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"Contexts must be an integer array [n_contexts, ctx_len], found dtype {arr.dtype} and shape "
            f"{list(arr.shape)}."
        )
    n, ctx_len = arr.shape
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ConfigError(f"start must be an integer position >= 0, found {start!r}.")
    if n < 1 or ctx_len - 1 - start < 1 or n * (ctx_len - 1 - start) < 2:
        scored = max(n * (ctx_len - 1 - start), 0)
        raise DataError(
            f"{n} context(s) of {ctx_len} tokens with start={start} leave {scored} scored prediction(s) "
            "(positions start .. ctx_len − 2); at least 2 are needed. Use more or longer contexts, or a "
            "smaller start."
        )
    vocab = int(model.get_input_embeddings().weight.shape[0])  # type: ignore[operator]
    if int(arr.min()) < 0 or int(arr.max()) >= vocab:
        raise DataError(
            f"Token ids must lie in [0, {vocab}) for this model, found [{int(arr.min())}, {int(arr.max())}]; "
            "were the contexts made with another tokenizer?"
        )
    return arr.astype(np.int64)


def check_sae_site(model: torch.nn.Module, name: str, sae: SAE) -> Site:
    """The SAE's hook site, checked against the model (HookSiteError) and its width (ShapeError)."""
    site = sae.cfg.hook_site
    if not site:
        raise HookSiteError(
            f"SAE {name!r} has no hook_site; set sae.cfg.hook_site (e.g. 'blocks.12.hook_resid_post')."
        )
    (parsed,) = validate_sites(model, [site])
    sae.check_input_width(model_width(model), parsed.name)
    return parsed


def check_probe(name: str, probe: tuple[Tensor, Tensor], d: int) -> tuple[Tensor, Tensor]:
    """(weights [d, d], bias [d]) as float32, or a ShapeError / DataError naming the SAE."""
    if not isinstance(probe, (tuple, list)) or len(probe) != 2:
        raise ShapeError(f"The probe of SAE {name!r} must be a pair (weights [d, d], bias [d]).")
    w, b = (torch.as_tensor(t).detach().float() for t in probe)
    if tuple(w.shape) != (d, d) or tuple(b.shape) != (d,):
        raise ShapeError(
            f"The probe of SAE {name!r} has weights {list(w.shape)} and bias {list(b.shape)}; expected "
            f"[{d}, {d}] and [{d}] (fit it on the SAE's own site)."
        )
    if not (bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())):
        raise DataError(f"The probe of SAE {name!r} holds NaN or inf values.")
    return w, b


def check_store_sae(store: ActivationStore, name: str, sae: SAE) -> str:
    """The store site the SAE reads, checked to exist in the store (StoreError) with the SAE's width."""
    site = sae.cfg.hook_site
    if site is None or site not in store.sites:
        raise StoreError(f"SAE {name!r} reads site {site!r}, which the store lacks (it has {store.sites}).")
    sae.check_input_width(store.d[site], site)
    return site


def site_order(site: Site) -> tuple[int, int]:
    """Execution order of sites in a forward pass (attn before mlp within a layer)."""
    return site.layer, _SITE_ORDER[site.kind]


def sae_recon(sae: SAE, x: Tensor) -> Tensor:
    """Sae(x) as float32 on x's device (the SAE runs in its own device and dtype)."""
    return sae(x.to(device=sae.device, dtype=sae.dtype)).to(device=x.device, dtype=torch.float32)


def placement(device: str | torch.device | None, sae: SAE) -> torch.device:
    """The device an experiment computes on: ``device`` when given, else the SAE's own."""
    return sae.device if device is None else torch.device(device)


def on_device(sae: SAE, device: str | torch.device, dtype: torch.dtype | None = None) -> SAE:
    """``sae`` on ``device`` in ``dtype`` (None: its own): itself when it is already there, else a copy
    there, so the caller's SAE is never moved."""
    dev, dt = torch.device(device), dtype or sae.dtype
    if _same_device(sae.device, dev) and sae.dtype == dt:
        return sae
    return type(sae).from_tensors(sae.cfg, dict(sae.named_tensors()), device=dev, dtype=dt, validate=False)


def probe_on(probe: tuple[Tensor, Tensor], device: str | torch.device) -> tuple[Tensor, Tensor]:
    """An error probe (weights, bias) on ``device`` (float32, as `check_probe` returns it)."""
    w, b = probe
    return w.to(device), b.to(device)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` (the current device) name the same device."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        current = torch.cuda.current_device() if a.type == "cuda" and torch.cuda.is_available() else 0
        return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)
    return a.index == b.index


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's weights: where its forward passes, and so the splices, compute."""
    return next(model.parameters()).device
