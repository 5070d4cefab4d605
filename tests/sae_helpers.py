"""Tiny synthetic SAEs written in each on-disk layout, for the SAE tests.

Every writer returns the tensors it wrote, in the source's own names and orientation, so tests can run the
format's forward equations on them directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor

D_IN = 8
D_SAE = 32


def gen(seed: int) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator, scale: float = 0.5) -> Tensor:
    """Gaussian float32 tensor."""
    return torch.randn(*shape, generator=g) * scale


def uniform(*shape: int, g: torch.Generator, low: float = 0.0, high: float = 1.0) -> Tensor:
    """Uniform float32 tensor in [low, high)."""
    return torch.rand(*shape, generator=g) * (high - low) + low


def inputs(n: int = 16, d: int = D_IN, seed: int = 123) -> Tensor:
    """Activations with a non-zero mean, like a residual stream."""
    g = gen(seed)
    return torch.randn(n, d, generator=g) * 2.0 + 0.3


def canonical_tensors(
    seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE, threshold: bool = False
) -> dict[str, Tensor]:
    """Random canonical tensors (decoder rows deliberately not unit norm)."""
    g = gen(seed)
    tensors = {
        "W_enc": randn(d_in, d_sae, g=g),
        "b_enc": randn(d_sae, g=g, scale=0.2),
        "W_dec": randn(d_sae, d_in, g=g) * uniform(d_sae, 1, g=g, low=0.5, high=2.0),
        "b_dec": randn(d_in, g=g, scale=0.3),
    }
    if threshold:
        tensors["threshold"] = uniform(d_sae, g=g, low=0.05, high=0.8)
    return tensors


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON file, creating parents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write a safetensors file, creating parents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


# --------------------------------------------------------------------------- SAELens


def write_saelens(
    folder: Path,
    *,
    architecture: str = "standard",
    k: int | None = None,
    normalize: Any = "none",
    apply_b_dec_to_input: bool = True,
    rescale_acts_by_decoder_norm: bool = False,
    hook_name: str = "blocks.3.hook_resid_post",
    v6: bool = True,
    finetuning_scaling_factor: bool = False,
    extra_cfg: dict[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Tensor]:
    """A SAELens folder (v6 nested cfg or pre-6 flat cfg)."""
    tensors = canonical_tensors(seed, threshold=architecture == "jumprelu")
    if finetuning_scaling_factor:
        tensors["scaling_factor"] = uniform(D_SAE, g=gen(seed + 1), low=0.5, high=1.5)
    if v6:
        cfg: dict[str, Any] = {
            "architecture": architecture,
            "d_in": D_IN,
            "d_sae": D_SAE,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": apply_b_dec_to_input,
            "normalize_activations": normalize,
            "reshape_activations": "none",
            "metadata": {"model_name": "tiny-model", "hook_name": hook_name, "context_size": 128},
        }
        if architecture == "topk":
            cfg.update(k=k, rescale_acts_by_decoder_norm=rescale_acts_by_decoder_norm)
    else:
        cfg = {
            "architecture": "standard" if architecture == "topk" else architecture,
            "d_in": D_IN,
            "d_sae": D_SAE,
            "activation_fn_str": "topk" if architecture == "topk" else "relu",
            "activation_fn_kwargs": {"k": k} if architecture == "topk" else {},
            "hook_point": hook_name,
            "hook_layer": 3,
            "model_name": "tiny-model",
            "apply_b_dec_to_input": apply_b_dec_to_input,
            "finetuning_scaling_factor": finetuning_scaling_factor,
            "normalize_activations": normalize,
            "context_size": 128,
        }
    cfg.update(extra_cfg or {})
    write_json(folder / "cfg.json", cfg)
    write_safetensors(folder / "sae_weights.safetensors", tensors)
    return tensors


# --------------------------------------------------------------------------- Gemma Scope


def gemma_scope_tensors(seed: int = 0, d_sae: int = D_SAE) -> dict[str, Tensor]:
    """Gemma Scope v1/v2 tensors (canonical orientation)."""
    return canonical_tensors(seed, d_sae=d_sae, threshold=True)


def write_gemma_scope(
    file: Path, *, lowercase: bool = False, seed: int = 0, d_sae: int = D_SAE
) -> dict[str, Tensor]:
    """A Gemma Scope v1 ``params.npz``."""
    tensors = gemma_scope_tensors(seed, d_sae)
    names = {k: (k.lower() if lowercase else k) for k in tensors}
    file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(file, **{names[k]: v.numpy() for k, v in tensors.items()})  # type: ignore[arg-type]
    return tensors


def write_gemma_scope_2(
    folder: Path, *, config: dict[str, Any] | None = None, seed: int = 0, d_sae: int = D_SAE
) -> dict[str, Tensor]:
    """A Gemma Scope 2 folder (lowercase tensor names + config.json); ``None`` config values are dropped."""
    tensors = gemma_scope_tensors(seed, d_sae)
    write_safetensors(folder / "params.safetensors", {k.lower(): v for k, v in tensors.items()})
    base = {
        "hf_hook_point_in": "model.layers.4.output",
        "hf_hook_point_out": "model.layers.4.output",
        "width": d_sae,
        "model_name": "gemma-3-1b-pt",
        "architecture": "jump_relu",
        "l0": 7,
        "affine_connection": False,
        "type": "sae",
    }
    merged = {k: v for k, v in {**base, **(config or {})}.items() if v is not None}
    write_json(folder / "config.json", merged)
    return tensors


# --------------------------------------------------------------------------- Llama Scope / llamascopium


def lm_saes_tensors(seed: int = 0) -> dict[str, Tensor]:
    """lm_saes weights as ``nn.Linear`` layouts (Llama Scope v1 names)."""
    g = gen(seed)
    return {
        "encoder.weight": randn(D_SAE, D_IN, g=g),
        "encoder.bias": randn(D_SAE, g=g, scale=0.2),
        "decoder.weight": randn(D_IN, D_SAE, g=g) * uniform(1, D_SAE, g=g, low=0.3, high=3.0),
        "decoder.bias": randn(D_IN, g=g, scale=0.3),
    }


def write_llama_scope(
    folder: Path, *, seed: int = 0, **hyperparams: Any
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A Llama Scope v1 folder; ``hyperparams`` override the defaults."""
    tensors = lm_saes_tensors(seed)
    hp: dict[str, Any] = {
        "d_model": D_IN,
        "expansion_factor": D_SAE // D_IN,
        "d_sae": D_SAE,
        "hook_point_in": "blocks.5.hook_resid_post",
        "hook_point_out": "blocks.5.hook_resid_post",
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": False,
        "norm_activation": "dataset-wise",
        "dataset_average_activation_norm": {"in": 6.5, "out": 6.5},
        "sparsity_include_decoder_norm": True,
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.4,
        "top_k": 5,
    }
    hp.update(hyperparams)
    write_json(folder / "hyperparams.json", hp)
    write_safetensors(folder / "checkpoints" / "final.safetensors", tensors)
    return tensors, hp


def write_llamascopium(
    folder: Path, *, seed: int = 0, **config: Any
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A llamascopium v2 folder with the dataset norms stored in the state dict."""
    g = gen(seed)
    hook = "blocks.2.hook_resid_post"
    tensors = {
        "W_E": randn(D_IN, D_SAE, g=g),
        "b_E": randn(D_SAE, g=g, scale=0.2),
        "W_D": randn(D_SAE, D_IN, g=g) * uniform(D_SAE, 1, g=g, low=0.3, high=3.0),
        "b_D": randn(D_IN, g=g, scale=0.3),
        "activation_function.log_jumprelu_threshold": torch.log(uniform(D_SAE, g=g, low=0.1, high=0.9)),
        f"dataset_average_activation_norm.{hook}": torch.tensor(5.25),
    }
    cfg: dict[str, Any] = {
        "sae_type": "sae",
        "d_model": D_IN,
        "expansion_factor": D_SAE / D_IN,
        "act_fn": "jumprelu",
        "norm_activation": "dataset-wise",
        "sparsity_include_decoder_norm": True,
        "top_k": 50,
        "use_decoder_bias": True,
        "hook_point_in": hook,
        "hook_point_out": hook,
    }
    cfg.update(config)
    write_json(folder / "config.json", cfg)
    write_safetensors(folder / "sae_weights.safetensors", tensors)
    return tensors, cfg


# --------------------------------------------------------------------------- sparsify


def sparsify_tensors(seed: int = 0, d_sae: int = D_SAE) -> dict[str, Tensor]:
    """sparsify's module state dict: ``W_dec`` is ``[num_latents, d_in]`` (no transpose)."""
    g = gen(seed)
    return {
        "encoder.weight": randn(d_sae, D_IN, g=g),
        "encoder.bias": randn(d_sae, g=g, scale=0.2),
        "W_dec": randn(d_sae, D_IN, g=g),
        "b_dec": randn(D_IN, g=g, scale=0.3),
    }


def write_sparsify(
    folder: Path, *, k: int = 4, seed: int = 0, cfg: dict[str, Any] | None = None
) -> dict[str, Tensor]:
    """One sparsify hookpoint folder."""
    tensors = sparsify_tensors(seed)
    base = {
        "activation": "topk",
        "expansion_factor": D_SAE // D_IN,
        "normalize_decoder": True,
        "num_latents": 0,
    }
    write_json(
        folder / "cfg.json",
        {**base, "k": k, "multi_topk": False, "skip_connection": False, "d_in": D_IN, **(cfg or {})},
    )
    write_safetensors(folder / "sae.safetensors", tensors)
    return tensors


# --------------------------------------------------------------------------- dictionary_learning


def dictionary_learning_state(
    dict_class: str, seed: int = 0, threshold: float = 0.3, k: int = 4
) -> dict[str, Tensor]:
    """A state dict as each dictionary_learning class saves it."""
    g = gen(seed)
    linear = {
        "encoder.weight": randn(D_SAE, D_IN, g=g),
        "encoder.bias": randn(D_SAE, g=g, scale=0.2),
        "decoder.weight": randn(D_IN, D_SAE, g=g),
    }
    bias = randn(D_IN, g=g, scale=0.3)
    if dict_class == "AutoEncoder":
        return {**linear, "bias": bias}
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {
            **linear,
            "b_dec": bias,
            "k": torch.tensor(k, dtype=torch.int),
            "threshold": torch.tensor(threshold),
        }
    canonical = {
        "W_enc": randn(D_IN, D_SAE, g=g),
        "b_enc": randn(D_SAE, g=g, scale=0.2),
        "W_dec": randn(D_SAE, D_IN, g=g) * uniform(D_SAE, 1, g=g, low=0.5, high=2.0),
        "b_dec": bias,
    }
    if dict_class == "MatryoshkaBatchTopKSAE":
        extra = {"k": torch.tensor(k, dtype=torch.int), "threshold": torch.tensor(threshold)}
        return {**canonical, **extra, "group_sizes": torch.tensor([8, 24])}
    if dict_class == "JumpReluAutoEncoder":
        return {**canonical, "threshold": uniform(D_SAE, g=g, low=0.05, high=0.6)}
    if dict_class == "GatedAutoEncoder":
        gate = {"r_mag": torch.zeros(D_SAE), "gate_bias": torch.zeros(D_SAE), "mag_bias": torch.zeros(D_SAE)}
        return {
            "encoder.weight": linear["encoder.weight"],
            "decoder.weight": linear["decoder.weight"],
            "decoder_bias": bias,
            **gate,
        }
    raise ValueError(dict_class)


def write_dictionary_learning(
    folder: Path,
    dict_class: str,
    *,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    write_config: bool = True,
    backup_norm_factor: float | None = None,
    **state_kwargs: Any,
) -> dict[str, Tensor]:
    """``ae.pt`` (+ ``config.json``); with ``backup_norm_factor`` the interrupted-run backup dict instead."""
    state = dictionary_learning_state(dict_class, seed, **state_kwargs)
    trainer = {"dict_class": dict_class, "activation_dim": D_IN, "dict_size": D_SAE, "layer": 3}
    trainer.update(lm_name="tiny-model", submodule_name="resid_post_layer_3", **(config or {}))
    folder.mkdir(parents=True, exist_ok=True)
    if backup_norm_factor is not None:
        optimizer = {"state": {0: {"step": torch.tensor(5.0)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
        backup = {
            "step": 5,
            "ae": state,
            "optimizer": optimizer,
            "config": trainer,
            "norm_factor": backup_norm_factor,
        }
        torch.save(backup, folder / "ae.pt")
    else:
        torch.save(state, folder / "ae.pt")
    if write_config:
        write_json(folder / "config.json", {"trainer": trainer, "buffer": {"d_submodule": D_IN, "io": "out"}})
    return state


# --------------------------------------------------------------------------- OpenAI


def openai_state(activation: str = "TopK", k: int = 4, seed: int = 0) -> dict[str, Any]:
    """An OpenAI ``sparse_autoencoder`` state dict, including its plain-Python entries."""
    g = gen(seed)
    state: dict[str, Any] = {
        "pre_bias": randn(D_IN, g=g, scale=0.3),
        "encoder.weight": randn(D_SAE, D_IN, g=g),
        "latent_bias": randn(D_SAE, g=g, scale=0.2),
        "decoder.weight": randn(D_IN, D_SAE, g=g),
        "stats_last_nonzero": torch.zeros(D_SAE, dtype=torch.long),
        "latents_activation_frequency": torch.rand(D_SAE, generator=g),
        "latents_mean_square": torch.rand(D_SAE, generator=g),
        "activation": activation,
    }
    if activation == "TopK":
        state["activation_state_dict"] = {"k": k, "postact_fn": "ReLU"}
    return state


def write_openai(file: Path, **kwargs: Any) -> dict[str, Any]:
    """An OpenAI ``{layer}.pt``."""
    state = openai_state(**kwargs)
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, file)
    return state


# --------------------------------------------------------------------------- damage


class Exploit:
    """Unpickling this creates ``marker``: a stand-in for a checkpoint that runs code when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (Path(self.marker),))


def truncate(path: Path, fraction: float = 0.5) -> None:
    """Cut a file to ``fraction`` of its bytes."""
    data = path.read_bytes()
    path.write_bytes(data[: max(1, math.floor(len(data) * fraction))])
