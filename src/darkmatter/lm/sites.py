"""Canonical hook-site names (TransformerLens style) and their module paths per HF architecture.

A site is ``blocks.{L}.{kind}`` with kind one of ``hook_resid_pre``, ``hook_resid_post``,
``hook_mlp_out``, ``hook_attn_out``. ``ARCHITECTURES`` is the single table mapping them to modules.

How each kind is read:
- ``hook_resid_pre``: the first input of decoder layer L.
- ``hook_resid_post``: the output of decoder layer L (equals ``hidden_states[L + 1]`` except where an
  architecture applies its final norm to the last entry of ``hidden_states``).
- ``hook_mlp_out`` / ``hook_attn_out``: what the MLP / attention block adds to the residual stream. For
  Gemma 2 that is the output of the post-norm (``post_feedforward_layernorm`` /
  ``post_attention_layernorm``), as in TransformerLens, so ``resid_pre + attn_out + mlp_out ==
  resid_post`` holds for every architecture in the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from darkmatter.errors import HookSiteError

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


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (relative to the CausalLM) for one architecture family."""

    layers: str  # ModuleList of decoder layers
    attn: str  # relative to a layer: module whose (first) output is the attention contribution
    mlp: str  # relative to a layer: module whose output is the MLP contribution
    final_norm: str  # the norm applied after the last layer
    embed: str
    plain_residual: bool = True  # resid_post == resid_pre + attn_out + mlp_out with these modules


_LLAMA = ArchSpec("model.layers", "self_attn", "mlp", "model.norm", "model.embed_tokens")
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "gemma2": ArchSpec(
        "model.layers",
        "post_attention_layernorm",
        "post_feedforward_layernorm",
        "model.norm",
        "model.embed_tokens",
    ),
    "gpt2": ArchSpec("transformer.h", "attn", "mlp", "transformer.ln_f", "transformer.wte"),
    "gpt_neox": ArchSpec(
        "gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm", "gpt_neox.embed_in"
    ),
}


def arch_spec(model: torch.nn.Module) -> ArchSpec:
    """The architecture table entry for a HF causal LM, or a clear error."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(str(model_type))
    if spec is None:
        raise HookSiteError(
            f"Architecture {model_type!r} has no hook-site mapping. Supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add an ArchSpec to darkmatter.lm.sites.ARCHITECTURES."
        )
    return spec


def get_module(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """Resolve a dotted module path."""
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise HookSiteError(
                f"Module path {path!r} not found in {type(root).__name__} (missing {part!r})."
            )
        mod = getattr(mod, part)
    return mod


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
    if site.kind == "hook_attn_out":
        return get_module(layer, spec.attn), False
    return get_module(layer, spec.mlp), False
