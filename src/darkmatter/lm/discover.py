"""Find a decoder-only causal LM's hook modules from its module structure.

Rules, applied to any Hugging Face causal LM (weights are not needed: a skeleton on the ``meta`` device
has the same structure):

- Decoder layers: the ``torch.nn.ModuleList`` whose length equals the config's ``num_hidden_layers`` and
  whose layers have an attention and an MLP child (for example ``model.layers``, ``transformer.h``,
  ``gpt_neox.layers``); among several, the shortest path.
- Attention: the first layer child named one of ``ATTN_NAMES``; MLP: the first named one of ``MLP_NAMES``
  (an MoE block that returns ``(hidden_states, router_logits)`` is read through its first output).
- A norm applied to a sub-block's *output* (Gemma 2/3, OLMo 2) is where that sub-block's contribution to
  the residual stream is read. ``post_feedforward_layernorm`` and the like always are such norms;
  ``post_attention_layernorm`` is one only when the layer also has a separate pre-MLP norm
  (``pre_feedforward_layernorm``) or no pre-attention norm at all, else it is the pre-MLP norm (Llama).
- Parallel residual layers (GPT-NeoX, StableLM, Phi) add both sub-blocks' outputs to the same input, so
  the module outputs still satisfy ``resid_pre + attn_out + mlp_out == resid_post``.
- A config with a ``residual_multiplier`` other than 1 scales the sub-block outputs inside the layer:
  ``hook_attn_out`` / ``hook_mlp_out`` are refused there (the residual-stream sites still work).

What these rules cannot tell is given as overrides: any ``ArchSpec`` field given replaces the discovered
one. ``register_override`` keeps them by ``model_type`` (``OVERRIDES``); ``use_overrides`` attaches them to
one model (a study's ``model.hook_modules``), and wins over the former. Every module an override names is
checked to exist before any forward pass.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from darkmatter.errors import HookSiteError

ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "attn_layer")
MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe", "ffn", "moe", "feedforward", "mlp_block")
PRE_ATTN_NORMS = ("input_layernorm", "ln_1", "attention_norm", "attn_norm", "norm1", "ln_attn")
PRE_MLP_NORMS = ("pre_feedforward_layernorm", "pre_mlp_layernorm", "ffn_norm_pre")
POST_ATTN_NORMS = ("post_self_attn_layernorm", "post_attn_layernorm", "post_attention_norm")
POST_MLP_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm", "post_ffn_layernorm", "post_mlp_norm")
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm")


@dataclass(frozen=True)
class ArchSpec:
    """Module paths (relative to the CausalLM) where a model's hook sites are read."""

    layers: str  # ModuleList of decoder layers
    attn: str  # relative to a layer: module whose (first) output is the attention contribution
    mlp: str  # relative to a layer: module whose (first) output is the MLP contribution
    final_norm: str | None = None  # the norm applied after the last layer, when one was found
    embed: str | None = None  # the input embedding
    plain_residual: bool = True  # resid_post == resid_pre + attn_out + mlp_out with these modules


class HookModules(BaseModel):
    """A study's ``model.hook_modules``: module paths that replace the discovered ones (``use_overrides``);
    empty fields keep them. The preflight checks them against the model's skeleton."""

    model_config = ConfigDict(extra="forbid")
    layers: str | None = Field(
        None, description="The ModuleList of decoder layers, e.g. 'model.decoder.layers'."
    )
    attn: str | None = Field(
        None, description="In a layer: the module whose (first) output is the attention's residual update."
    )
    mlp: str | None = Field(
        None,
        description="In a layer: the module whose (first) output is the MLP's residual update, e.g. 'fc2'.",
    )
    final_norm: str | None = Field(None, description="The norm after the last layer.")
    embed: str | None = Field(None, description="The input embedding.")
    plain_residual: bool | None = Field(
        None, description="Whether resid_post = resid_pre + attn_out + mlp_out with these modules."
    )

    def given(self) -> dict[str, Any]:
        """The fields set, as ``darkmatter.lm.discover.use_overrides`` takes them."""
        return self.model_dump(exclude_none=True)


OVERRIDES: dict[str, dict[str, Any]] = {}
_CACHE: weakref.WeakKeyDictionary[torch.nn.Module, ArchSpec] = weakref.WeakKeyDictionary()
_MODEL_OVERRIDES: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]] = weakref.WeakKeyDictionary()
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ArchSpec))


def _checked_fields(fields: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(fields) - set(ARCH_FIELDS))
    if unknown:
        raise HookSiteError(f"Unknown override field(s) {unknown}; ArchSpec fields: {sorted(ARCH_FIELDS)}.")
    return {k: v for k, v in fields.items() if v is not None}


def register_override(model_type: str, **fields: Any) -> None:
    """Fix hook modules discovery gets wrong or cannot find, e.g. ``register_override("x", mlp="ffn")``."""
    OVERRIDES[model_type] = {**OVERRIDES.get(model_type, {}), **_checked_fields(fields)}
    _CACHE.clear()


def use_overrides(model: torch.nn.Module, fields: dict[str, Any]) -> ArchSpec:
    """Attach overrides to one model (they win over ``register_override``'s for its type) and return its
    hook modules, every named one checked to exist."""
    _MODEL_OVERRIDES[model] = _checked_fields(fields)
    _CACHE.pop(model, None)
    return arch_spec(model)


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


def _config(model: torch.nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return config


def _model_type(model: torch.nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None))


def _how_to_override(model_type: str, layers: str = "model.layers") -> str:
    return (
        f"Name the modules with darkmatter.lm.discover.register_override({model_type!r}, "
        f"layers={layers!r}, attn='self_attn', mlp='mlp'), or in a study with --set "
        f"model.hook_modules.layers={layers} (and .attn, .mlp) (attn and mlp: the children of a layer whose "
        "outputs are added to the residual stream)."
    )


def _children(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: c for n, c in module.named_children() if c is not None}


def _first_named(module: torch.nn.Module, names: tuple[str, ...]) -> str | None:
    children = _children(module)
    return next((n for n in names if n in children), None)


def _has(module: torch.nn.Module, path: str) -> bool:
    try:
        get_module(module, path)
    except HookSiteError:
        return False
    return True


def _n_layers_wanted(model: torch.nn.Module) -> int | None:
    config = _config(model)
    want = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    return None if want is None else int(want)


def _find_layers(model: torch.nn.Module, model_type: str, over: dict[str, Any]) -> str:
    want = _n_layers_wanted(model)
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    sized = [(p, m) for p, m in lists if want is None or len(m) == want]

    def has_attn(layer: torch.nn.Module) -> bool:
        return _has(layer, over["attn"]) if "attn" in over else _first_named(layer, ATTN_NAMES) is not None

    def has_mlp(layer: torch.nn.Module) -> bool:
        return _has(layer, over["mlp"]) if "mlp" in over else _first_named(layer, MLP_NAMES) is not None

    blocks = [p for p, m in sized if has_attn(m[0]) and has_mlp(m[0])]
    if blocks:
        return min(blocks, key=lambda p: (p.count("."), len(p)))
    found = ", ".join(f"{p or '<root>'} ({len(m)} x {type(m[0]).__name__})" for p, m in lists) or "none"
    children = ", ".join(sorted(_children(sized[0][1][0]))) if sized else "-"
    raise HookSiteError(
        f"Could not find the decoder layers of {type(model).__name__} (model_type {model_type!r}): "
        f"wanted a ModuleList of {want} layers, each with an attention child "
        f"({repr(over['attn']) + ', the override' if 'attn' in over else ', '.join(ATTN_NAMES)}) and an MLP "
        f"child ({repr(over['mlp']) + ', the override' if 'mlp' in over else ', '.join(MLP_NAMES)}). "
        f"ModuleLists found: {found}; children of the first "
        f"layer of the right count: {children}. "
        + _how_to_override(model_type, sized[0][0] if sized else "model.layers")
    )


def layer_reads(
    layer: torch.nn.Module, model_type: str = "?", attn: str | None = None, mlp: str | None = None
) -> tuple[str, str]:
    """(attention read, MLP read): the children of one decoder layer whose outputs are the sub-block
    contributions to the residual stream; ``attn`` / ``mlp`` when given (overrides) are taken as they are."""
    attn_child = attn or _first_named(layer, ATTN_NAMES)
    mlp_child = mlp or _first_named(layer, MLP_NAMES)
    if attn_child is None or mlp_child is None:
        raise HookSiteError(
            f"Decoder layer {type(layer).__name__} (model_type {model_type!r}) has no "
            f"{'attention' if attn_child is None else 'MLP'} child among "
            f"{', '.join(sorted(_children(layer)))}. " + _how_to_override(model_type)
        )
    post_mlp = _first_named(layer, POST_MLP_NORMS)
    post_attn = _first_named(layer, POST_ATTN_NORMS)
    if post_attn is None and "post_attention_layernorm" in _children(layer):
        sandwich = _first_named(layer, PRE_MLP_NORMS) is not None
        no_pre_norm = _first_named(layer, PRE_ATTN_NORMS) is None
        if sandwich or no_pre_norm:
            post_attn = "post_attention_layernorm"
    return attn or post_attn or attn_child, mlp or post_mlp or mlp_child


def _find_final_norm(model: torch.nn.Module, layers: str) -> str | None:
    parent = layers.rpartition(".")[0]
    base = get_module(model, parent) if parent else model
    name = _first_named(base, FINAL_NORMS)
    if name is None:
        return None
    return f"{parent}.{name}" if parent else name


def _find_embed(model: torch.nn.Module) -> str | None:
    try:
        embed = model.get_input_embeddings()  # type: ignore[operator]
    except (AttributeError, NotImplementedError):
        return None
    return next((p for p, m in model.named_modules() if m is embed), None)


def _plain_residual(model: torch.nn.Module) -> bool:
    mult = getattr(_config(model), "residual_multiplier", None)
    return mult is None or float(mult) == 1.0


def discover(model: torch.nn.Module) -> ArchSpec:
    """Where a model's hook sites are read: overrides for its ``model_type``, the rules for the rest."""
    model_type = _model_type(model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise HookSiteError(
            f"{type(model).__name__} (model_type {model_type!r}) is an encoder-decoder model; hook "
            "sites are defined for decoder-only causal LMs."
        )
    over = {**OVERRIDES.get(model_type, {}), **(_MODEL_OVERRIDES.get(model) or {})}
    _check_model_paths(model, over)
    layers = over.get("layers") or _find_layers(model, model_type, over)
    stack = get_module(model, layers)
    if not isinstance(stack, torch.nn.ModuleList) or len(stack) == 0:
        raise HookSiteError(f"{layers!r} of {type(model).__name__} is not a non-empty ModuleList.")
    _check_layer_paths(stack, layers, over)
    attn, mlp = layer_reads(stack[0], model_type, over.get("attn"), over.get("mlp"))
    return ArchSpec(
        layers=layers,
        attn=attn,
        mlp=mlp,
        final_norm=over.get("final_norm", _find_final_norm(model, layers)),
        embed=over.get("embed", _find_embed(model)),
        plain_residual=over.get("plain_residual", _plain_residual(model)),
    )


def _children_of(module: torch.nn.Module, path: str) -> str:
    """The children of the deepest module of ``path`` that exists (for error messages)."""
    parent = module
    for part in path.split(".")[:-1]:
        if not hasattr(parent, part):
            break
        parent = getattr(parent, part)
    return ", ".join(sorted(_children(parent))) or "none"


def _check_model_paths(model: torch.nn.Module, over: dict[str, Any]) -> None:
    """Every module an override names in the model exists; ``layers`` is a ModuleList of the config's
    depth."""
    name = type(model).__name__
    for key in ("layers", "final_norm", "embed"):
        if key in over and not _has(model, over[key]):
            raise HookSiteError(
                f"Hook-module override {key}={over[key]!r}: no such module in {name}; the children there "
                f"are: {_children_of(model, over[key])}."
            )
    if "layers" in over:
        stack = get_module(model, over["layers"])
        want = _n_layers_wanted(model)
        size = len(stack) if isinstance(stack, torch.nn.ModuleList) else None
        if not size or want not in (None, size):
            found = f"a {type(stack).__name__}" if size is None else f"a ModuleList of {size}"
            raise HookSiteError(
                f"Hook-module override layers={over['layers']!r} is {found} in {name}; expected a ModuleList "
                f"of the config's {want} decoder layers."
            )


def _check_layer_paths(stack: torch.nn.Module, layers: str, over: dict[str, Any]) -> None:
    """The ``attn`` and ``mlp`` overrides name a module in every decoder layer."""
    for key in ("attn", "mlp"):
        if key not in over:
            continue
        for i, layer in enumerate(stack.children()):
            if not _has(layer, over[key]):
                raise HookSiteError(
                    f"Hook-module override {key}={over[key]!r}: layer {i} ({type(layer).__name__}) of "
                    f"{layers!r} has no such module; its children are: {_children_of(layer, over[key])}."
                )


def arch_spec(model: torch.nn.Module) -> ArchSpec:
    """``discover(model)``, cached per model."""
    spec = _CACHE.get(model)
    if spec is None:
        spec = _CACHE[model] = discover(model)
    return spec


def discover_from_config(
    config: Any, *, trust_remote_code: bool = False, overrides: dict[str, Any] | None = None
) -> ArchSpec | None:
    """Discover the hook modules of a model from its config alone: its skeleton is built on ``meta``
    (with ``overrides`` attached as ``use_overrides`` would, so each module they name is checked).

    A config no causal LM class accepts is a ``HookSiteError``; a skeleton that cannot be built on
    ``meta`` for another reason (custom code that needs real tensors at init) gives None: the sites are
    then found when the weights load.
    """
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        raise HookSiteError(
            f"model_type {getattr(config, 'model_type', None)!r} is not a causal LM that transformers can "
            f"build: {exc}"
        ) from exc
    except Exception:  # any other failure is the skeleton's (meta device), not the model's
        return None
    return use_overrides(skeleton, overrides or {})
