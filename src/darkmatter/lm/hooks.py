"""Reading and replacing activations at hook sites of a HF causal LM.

``capture`` records sites during a forward pass and can stop the pass once every requested site is
seen; ``splice`` replaces a site's activation at chosen positions and leaves the rest bit-identical.
Decoder layers return a Tensor in transformers 5.x and a tuple in 4.x: both are handled.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from darkmatter.lm.sites import Site, site_module, validate_sites


class _StopForwardError(Exception):
    """Raised inside a hook to end a forward pass after the last needed site."""


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_first(output: Any, new: torch.Tensor) -> Any:
    return (new, *output[1:]) if isinstance(output, tuple) else new


def _input_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class Capture:
    """Activations captured by ``capture``: ``acts[site_name]`` is ``[batch, seq, d]``."""

    def __init__(self) -> None:
        self.acts: dict[str, torch.Tensor] = {}
        self.stopped_early = False


@contextmanager
def capture(model: torch.nn.Module, sites: list[str], *, stop_early: bool = False) -> Iterator[Capture]:
    """Record ``sites`` during forward passes inside the block.

    With ``stop_early`` the forward pass is aborted as soon as all sites are recorded (use ``run`` to
    call the model so the abort is swallowed). Captured tensors are detached views of the model's own.
    """
    parsed = validate_sites(model, sites)
    cap = Capture()
    handles = []

    def record(site: Site, value: torch.Tensor) -> None:
        cap.acts[site.name] = value.detach()
        if stop_early and len(cap.acts) == len(parsed):
            cap.stopped_early = True
            raise _StopForwardError

    for site in parsed:
        module, read_input = site_module(model, site)
        if read_input:

            def pre_hook(_m: Any, args: Any, kwargs: Any, site: Site = site) -> None:
                record(site, _input_of(args, kwargs))

            handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        else:

            def hook(_m: Any, _args: Any, output: Any, site: Site = site) -> None:
                record(site, _first(output))

            handles.append(module.register_forward_hook(hook))
    try:
        yield cap
    finally:
        for h in handles:
            h.remove()


def run(model: torch.nn.Module, **inputs: Any) -> Any:
    """Call the model, swallowing the early stop of ``capture``; returns None when stopped early."""
    try:
        return model(**inputs)
    except _StopForwardError:
        return None


Replacement = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def splice(
    model: torch.nn.Module,
    site: str,
    replace: Replacement,
    *,
    start: int = 0,
    mask: torch.Tensor | None = None,
) -> Iterator[None]:
    """Replace the activation at ``site`` for positions ``>= start`` (or where ``mask [batch, seq]``).

    ``replace`` maps the selected activations ``[n, d]`` to replacements of the same shape. Every other
    position keeps its exact original value.
    """
    (parsed,) = validate_sites(model, [site])
    module, read_input = site_module(model, parsed)

    def patched(x: torch.Tensor) -> torch.Tensor:
        sel = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        if mask is not None:
            sel |= mask.to(x.device)
        else:
            sel[:, start:] = True
        new = x.clone()
        rep = replace(x[sel])
        if rep.shape != x[sel].shape:
            raise ValueError(
                f"splice replacement has shape {tuple(rep.shape)}, expected {tuple(x[sel].shape)}"
            )
        new[sel] = rep.to(x.dtype)
        return new

    if read_input:

        def pre_hook(_m: Any, args: Any, kwargs: Any) -> Any:
            if args:
                return (patched(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": patched(kwargs["hidden_states"])}

        handle = module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def hook(_m: Any, _args: Any, output: Any) -> Any:
            return _with_first(output, patched(_first(output)))

        handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
