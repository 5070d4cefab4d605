"""Canonical hook-site names (TransformerLens style) and the modules that hold them.

A site is ``blocks.{L}.{kind}`` with kind one of ``hook_resid_pre``, ``hook_resid_post``,
``hook_mlp_out``, ``hook_attn_out``. ``darkmatter.lm.discover`` finds the modules of any decoder-only HF
causal LM from its structure (with ``OVERRIDES`` for what it cannot tell).

How each kind is read:
- ``hook_resid_pre``: the first input of decoder layer L.
- ``hook_resid_post``: the output of decoder layer L (equals ``hidden_states[L + 1]`` except where an
  architecture applies its final norm to the last entry of ``hidden_states``).
- ``hook_mlp_out`` / ``hook_attn_out``: what the MLP / attention block adds to the residual stream. For
  Gemma 2/3 and OLMo 2 that is the output of the post-norm (``post_feedforward_layernorm`` /
  ``post_attention_layernorm``), as in TransformerLens, so ``resid_pre + attn_out + mlp_out ==
  resid_post``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from darkmatter.errors import HookSiteError
from darkmatter.lm.discover import ArchSpec, arch_spec, get_module, layer_reads

__all__ = ["SITE_KINDS", "ArchSpec", "Site", "arch_spec", "get_module", "parse_site", "site_module"]

SITE_KINDS = ("hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out")
_SITE_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_mlp_out|hook_attn_out)$")


@dataclass(frozen=True)
class Site:
    """A parsed hook site."""

    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name


def parse_site(name: str) -> Site:
    """Parse ``blocks.{L}.{kind}``; also accepts sparsify's ``layers.L`` for resid_post."""
    name = name.strip()
    m = re.fullmatch(r"layers\.(\d+)", name)
    if m:
        return Site(int(m.group(1)), "hook_resid_post")
    m = _SITE_RE.match(name)
    if not m:
        raise HookSiteError(
            f"Unknown hook site {name!r}. Expected 'blocks.<layer>.<kind>' with kind one of "
            f"{', '.join(SITE_KINDS)} (for example 'blocks.12.hook_resid_post')."
        )
    return Site(int(m.group(1)), m.group(2))


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    layers = get_module(model, arch_spec(model).layers)
    assert isinstance(layers, torch.nn.ModuleList)
    return layers


def n_layers(model: torch.nn.Module) -> int:
    return len(decoder_layers(model))


def validate_sites(model: torch.nn.Module, names: list[str]) -> list[Site]:
    """Parse site names and check their layers exist in the model."""
    sites = [parse_site(n) for n in names]
    if not sites:
        raise HookSiteError("No hook sites requested.")
    n = n_layers(model)
    for s in sites:
        if not 0 <= s.layer < n:
            raise HookSiteError(
                f"Hook site {s.name!r} asks for layer {s.layer}, but the model has {n} layers (0..{n - 1})."
            )
    return sites


def site_module(model: torch.nn.Module, site: Site) -> tuple[torch.nn.Module, bool]:
    """The module to hook for a site and whether to read its input (True) or its output (False)."""
    spec = arch_spec(model)
    layer = decoder_layers(model)[site.layer]
    if site.kind == "hook_resid_pre":
        return layer, True
    if site.kind == "hook_resid_post":
        return layer, False
    if not spec.plain_residual:
        raise HookSiteError(
            f"{site.name!r}: {type(model).__name__} scales its attention and MLP outputs before adding "
            "them to the residual stream (residual_multiplier), so they are not the stream's components; "
            "use hook_resid_pre / hook_resid_post sites."
        )
    path = spec.attn if site.kind == "hook_attn_out" else spec.mlp
    try:
        return get_module(layer, path), False
    except HookSiteError:  # a layer built differently from layer 0 (hybrid stacks)
        attn, mlp = layer_reads(layer, str(getattr(getattr(model, "config", None), "model_type", "?")))
        return get_module(layer, attn if site.kind == "hook_attn_out" else mlp), False
