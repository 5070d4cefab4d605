"""Each format against its own forward equations, round trips through save_sae, damaged input, the CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import Tensor
from typer.testing import CliRunner

from darkmatter.errors import DataError, SAEFormatError, ShapeError
from darkmatter.sae import SAE, canonical_hook_site, detect_format, load_sae, save_sae
from darkmatter.sae.cli import app

from sae_helpers import (
    D_IN,
    D_SAE,
    Exploit,
    inputs,
    truncate,
    write_dictionary_learning,
    write_gemma_scope,
    write_gemma_scope_2,
    write_json,
    write_llama_scope,
    write_llamascopium,
    write_openai,
    write_saelens,
    write_safetensors,
    write_sparsify,
)

ATOL = RTOL = 1e-4


def topk_scatter(pre: Tensor, k: int) -> Tensor:
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals)


def assert_matches(sae: SAE, x: Tensor, codes: Tensor, recon: Tensor) -> None:
    """Codes and reconstruction equal the reference (float32 summation order differs: scale atol by size)."""
    torch.testing.assert_close(sae.encode(x), codes, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(sae(x), recon, atol=1e-5 * max(1.0, float(recon.abs().max())), rtol=1e-4)
    assert (codes != 0).any(), "the test SAE should have active latents"


# --------------------------------------------------------------------------- SAELens


def saelens_reference(
    raw: dict[str, Tensor], cfg: dict[str, Any], x: Tensor, scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """SAELens inference: process_sae_in, architecture encode, decode, undo normalization."""
    arch = cfg.get("architecture", "standard")
    if cfg.get("activation_fn_str") == "topk":
        arch = "topk"
    k = int(cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k") or 0)
    norm = cfg.get("normalize_activations")
    sae_in = x * scale
    mu = std = factor = None
    if norm == "layer_norm":
        mu = sae_in.mean(-1, keepdim=True)
        std = (sae_in - mu).std(-1, keepdim=True)
        sae_in = (sae_in - mu) / (std + 1e-5)
    elif norm == "constant_norm_rescale":
        factor = math.sqrt(D_IN) / sae_in.norm(dim=-1, keepdim=True)
        sae_in = sae_in * factor
    if cfg.get("apply_b_dec_to_input", True):
        sae_in = sae_in - raw["b_dec"]
    pre = sae_in @ raw["W_enc"] + raw["b_enc"]
    dec_norm = raw["W_dec"].norm(dim=-1)
    if arch == "standard":
        f = torch.relu(pre)
    elif arch == "jumprelu":
        f = torch.relu(pre) * (pre > raw["threshold"])
    else:
        if cfg.get("rescale_acts_by_decoder_norm"):
            pre = pre * dec_norm
        f = torch.relu(topk_scatter(pre, k))
    f_dec = f / dec_norm if cfg.get("rescale_acts_by_decoder_norm") else f
    if cfg.get("finetuning_scaling_factor"):
        f_dec = f_dec * raw["scaling_factor"]
    out = f_dec @ raw["W_dec"] + raw["b_dec"]
    if mu is not None and std is not None:
        out = out * std + mu
    if factor is not None:
        out = out / factor
    return f, out / scale


SAELENS_CASES = [
    {"architecture": "standard"},
    {"architecture": "standard", "apply_b_dec_to_input": False, "normalize": "layer_norm"},
    {"architecture": "jumprelu", "apply_b_dec_to_input": False},
    {"architecture": "jumprelu", "normalize": "constant_norm_rescale"},
    {"architecture": "topk", "k": 5},
    {"architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": True},
    {"architecture": "topk", "k": 3, "v6": False},
    {"architecture": "standard", "v6": False, "finetuning_scaling_factor": True, "normalize": False},
]


@pytest.mark.parametrize("case", SAELENS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_saelens_matches_its_equations(tmp_path: Path, case: dict[str, Any]) -> None:
    raw = write_saelens(tmp_path / "sae", **case)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    sae = load_sae(tmp_path / "sae")
    x = inputs()
    assert_matches(sae, x, *saelens_reference(raw, cfg, x))
    assert sae.cfg.source_format == "saelens"
    assert sae.cfg.hook_site == "blocks.3.hook_resid_post"
    assert sae.cfg.model_name == "tiny-model"
    if case.get("rescale_acts_by_decoder_norm"):
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_saelens_expected_average_norm_reads_the_scaler(tmp_path: Path) -> None:
    raw = write_saelens(tmp_path / "sae", normalize="expected_average_only_in")
    write_json(tmp_path / "sae" / "activation_scaler.json", {"scaling_factor": 0.25})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    sae = load_sae(tmp_path / "sae")
    assert sae.cfg.input_scale == 0.25
    x = inputs()
    assert_matches(sae, x, *saelens_reference(raw, {**cfg, "normalize_activations": "none"}, x, scale=0.25))


def test_saelens_expected_average_norm_without_factor_explains_the_fix(tmp_path: Path) -> None:
    write_saelens(tmp_path / "sae", normalize="expected_average_only_in")
    with pytest.raises(SAEFormatError, match=r"activation_scaler\.json"):
        load_sae(tmp_path / "sae")


def test_saelens_gated_is_refused_clearly(tmp_path: Path) -> None:
    write_saelens(tmp_path / "sae", architecture="gated")
    with pytest.raises(SAEFormatError, match="gated SAE"):
        load_sae(tmp_path / "sae")


def test_saelens_config_contradicting_tensors(tmp_path: Path) -> None:
    write_saelens(tmp_path / "sae", extra_cfg={"d_sae": 64})
    with pytest.raises(
        SAEFormatError, match=r"'W_enc' has shape \(8, 32\), but the config implies \(8, 64\)"
    ):
        load_sae(tmp_path / "sae")


# --------------------------------------------------------------------------- Gemma Scope


def gemma_reference(raw: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    pre = x @ raw["W_enc"] + raw["b_enc"]
    f = (pre > raw["threshold"]) * torch.relu(pre)
    return f, f @ raw["W_dec"] + raw["b_dec"]


def test_gemma_scope_v1_from_the_hf_cache_path(tmp_path: Path) -> None:
    folder = (
        tmp_path
        / "models--google--gemma-scope-2b-pt-res"
        / "snapshots"
        / "abc"
        / "layer_5"
        / "width_16k"
        / "average_l0_40"
    )
    raw = write_gemma_scope(folder / "params.npz", lowercase=True, d_sae=16384)
    sae = load_sae(folder)
    x = inputs()
    assert_matches(sae, x, *gemma_reference(raw, x))
    assert sae.cfg.source_format == "gemma_scope"
    assert sae.cfg.hook_site == "blocks.5.hook_resid_post"
    assert sae.cfg.model_name == "google/gemma-2-2b"
    assert sae.cfg.apply_b_dec_to_input is False
    assert sae.cfg.metadata["average_l0"] == 40


def test_gemma_scope_v1_attention_site_and_plain_file(tmp_path: Path) -> None:
    file = tmp_path / "gemma-scope-9b-it-att" / "layer_2" / "width_32k" / "average_l0_9" / "params.npz"
    write_gemma_scope(file, d_sae=32768)
    sae = load_sae(file)
    assert sae.cfg.hook_site == "blocks.2.attn.hook_z"
    nested = load_sae(tmp_path / "gemma-scope-9b-it-att", hookpoint="layer_2/width_32k/average_l0_9")
    assert torch.equal(nested.W_enc, sae.W_enc)
    assert sae.cfg.model_name == "google/gemma-2-9b-it"
    assert sae.cfg.metadata["reshape_activations"] == "hook_z"


def test_gemma_scope_v1_width_contradicting_path(tmp_path: Path) -> None:
    file = tmp_path / "layer_5" / "width_16k" / "average_l0_40" / "params.npz"
    write_gemma_scope(file)  # 32 latents, not 16384
    with pytest.raises(SAEFormatError, match="width_16k"):
        load_sae(file)


def test_gemma_scope_2(tmp_path: Path) -> None:
    folder = tmp_path / "resid_post" / "layer_4_width_16k_l0_small"
    raw = write_gemma_scope_2(folder, d_sae=16384)
    sae = load_sae(folder)
    x = inputs()
    assert_matches(sae, x, *gemma_reference(raw, x))
    assert sae.cfg.source_format == "gemma_scope_2"
    assert sae.cfg.hook_site == "blocks.4.hook_resid_post"
    assert sae.cfg.model_name == "google/gemma-3-1b-pt"
    assert sae.cfg.metadata["l0"] == 7


def test_gemma_scope_2_site_from_the_folder_names(tmp_path: Path) -> None:
    folder = tmp_path / "mlp_out_all" / "layer_2_width_16k_l0_big"
    write_gemma_scope_2(folder, d_sae=16384, config={"hf_hook_point_in": None, "hf_hook_point_out": None})
    assert load_sae(folder).cfg.hook_site == "blocks.2.hook_mlp_out"


def test_gemma_scope_2_width_label_is_checked(tmp_path: Path) -> None:
    folder = tmp_path / "resid_post" / "layer_4_width_262k_l0_small"
    write_gemma_scope_2(folder, config={"width": None})
    with pytest.raises(SAEFormatError, match="width_262k"):
        load_sae(folder)


def test_gemma_scope_2_transcoder_is_refused(tmp_path: Path) -> None:
    write_gemma_scope_2(
        tmp_path / "tc", config={"hf_hook_point_out": "model.layers.4.post_feedforward_layernorm.output"}
    )
    with pytest.raises(SAEFormatError, match="transcoder"):
        load_sae(tmp_path / "tc")


# --------------------------------------------------------------------------- Llama Scope / llamascopium


def lm_saes_reference(
    enc_w: Tensor,
    enc_b: Tensor,
    dec_w: Tensor,
    dec_b: Tensor,
    x: Tensor,
    *,
    hp: dict[str, Any],
    threshold: Tensor | float,
    norm_in: float,
    norm_out: float,
) -> tuple[Tensor, Tensor]:
    """lm_saes encode/decode; enc_w [F, d], dec_w [d, F]. Returns (f * ||W_dec|| (our codes), recon)."""
    root = math.sqrt(hp["d_model"])
    xn = x * (root / norm_in)
    if hp.get("apply_decoder_bias_to_pre_encoder"):
        xn = xn - dec_b
    pre = xn @ enc_w.T + enc_b
    dec_norm = dec_w.norm(dim=0)
    include = hp.get("sparsity_include_decoder_norm", True)
    score = pre * dec_norm if include else pre
    if hp["act_fn"] == "jumprelu":
        mask = score > threshold
    elif hp["act_fn"] == "topk":
        clamped = score.clamp(min=0)
        kth = clamped.kthvalue(clamped.shape[-1] - hp["top_k"] + 1, dim=-1, keepdim=True).values
        mask = clamped >= kth
    else:
        mask = score > 0
    f = pre * mask
    recon = (f @ dec_w.T + dec_b) / (root / norm_out)
    return (f * dec_norm if include else f), recon


def llama_reference(raw: dict[str, Tensor], hp: dict[str, Any], x: Tensor) -> tuple[Tensor, Tensor]:
    norms = hp["dataset_average_activation_norm"]
    return lm_saes_reference(
        raw["encoder.weight"], raw["encoder.bias"], raw["decoder.weight"], raw["decoder.bias"], x,
        hp=hp, threshold=hp["jump_relu_threshold"], norm_in=norms["in"], norm_out=norms["out"],
    )  # fmt: skip


LLAMA_CASES = [
    {},
    {"sparsity_include_decoder_norm": False},
    {"act_fn": "topk"},
    {"act_fn": "relu", "apply_decoder_bias_to_pre_encoder": True},
    {"dataset_average_activation_norm": {"in": 6.5, "out": 3.25}, "apply_decoder_bias_to_pre_encoder": True},
]


@pytest.mark.parametrize(
    "case", LLAMA_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_llama_scope_matches_lm_saes(tmp_path: Path, case: dict[str, Any]) -> None:
    raw, hp = write_llama_scope(tmp_path / "L5R", **case)
    sae = load_sae(tmp_path / "L5R")
    x = inputs()
    assert_matches(sae, x, *llama_reference(raw, hp, x))
    assert sae.cfg.source_format == "llama_scope"
    assert sae.cfg.hook_site == "blocks.5.hook_resid_post"
    assert sae.cfg.input_scale == pytest.approx(math.sqrt(D_IN) / 6.5)
    if hp["sparsity_include_decoder_norm"] and hp["dataset_average_activation_norm"]["out"] == 6.5:
        torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(D_SAE))


def test_llama_scope_transcoder_and_missing_norms_are_refused(tmp_path: Path) -> None:
    write_llama_scope(
        tmp_path / "tc", hook_point_in="blocks.5.ln2.hook_normalized", hook_point_out="blocks.5.hook_mlp_out"
    )
    with pytest.raises(SAEFormatError, match="transcoder"):
        load_sae(tmp_path / "tc")
    write_llama_scope(tmp_path / "nonorm", dataset_average_activation_norm=None)
    with pytest.raises(SAEFormatError, match="dataset_average_activation_norm"):
        load_sae(tmp_path / "nonorm")


def test_llamascopium_v2(tmp_path: Path) -> None:
    raw, cfg = write_llamascopium(tmp_path / "v2")
    sae = load_sae(tmp_path / "v2")
    x = inputs()
    threshold = raw["activation_function.log_jumprelu_threshold"].exp()
    expected = lm_saes_reference(
        raw["W_E"].T,
        raw["b_E"],
        raw["W_D"].T,
        raw["b_D"],
        x,
        hp=cfg,
        threshold=threshold,
        norm_in=5.25,
        norm_out=5.25,
    )
    assert_matches(sae, x, *expected)
    assert sae.cfg.source_format == "llamascopium"
    assert sae.cfg.hook_site == "blocks.2.hook_resid_post"


# --------------------------------------------------------------------------- sparsify


def sparsify_reference(raw: dict[str, Tensor], k: int, x: Tensor) -> tuple[Tensor, Tensor]:
    pre = torch.relu((x - raw["b_dec"]) @ raw["encoder.weight"].T + raw["encoder.bias"])
    f = topk_scatter(pre, k)
    return f, f @ raw["W_dec"] + raw["b_dec"]


def test_sparsify_matches_its_equations(tmp_path: Path) -> None:
    raw = write_sparsify(tmp_path / "run" / "layers.6", k=4)
    sae = load_sae(tmp_path / "run" / "layers.6")
    x = inputs()
    assert_matches(sae, x, *sparsify_reference(raw, 4, x))
    assert sae.cfg.hook_site == "blocks.6.hook_resid_post"
    assert sae.cfg.k == 4 and sae.cfg.activation == "topk"


def test_sparsify_run_folder_needs_a_hookpoint(tmp_path: Path) -> None:
    write_sparsify(tmp_path / "run" / "layers.6", seed=1)
    raw = write_sparsify(tmp_path / "run" / "layers.8", seed=2)
    with pytest.raises(SAEFormatError, match=r"hookpoint.*layers\.6, layers\.8"):
        load_sae(tmp_path / "run")
    sae = load_sae(tmp_path / "run", hookpoint="layers.8")
    assert sae.cfg.hook_site == "blocks.8.hook_resid_post"
    torch.testing.assert_close(sae.W_dec, raw["W_dec"])
    with pytest.raises(SAEFormatError, match=r"available hookpoints: layers\.6, layers\.8"):
        load_sae(tmp_path / "run", hookpoint="layers.9")


def test_sparsify_transposed_decoder_is_caught(tmp_path: Path) -> None:
    raw = write_sparsify(tmp_path / "layers.1")
    write_safetensors(tmp_path / "layers.1" / "sae.safetensors", {**raw, "W_dec": raw["W_dec"].T})
    with pytest.raises(SAEFormatError, match=r"'W_dec' has shape \(8, 32\).*\(32, 8\)"):
        load_sae(tmp_path / "layers.1")


def test_sparsify_keeps_the_stored_dtype_unless_asked(tmp_path: Path) -> None:
    raw = write_sparsify(tmp_path / "layers.2")
    write_safetensors(tmp_path / "layers.2" / "sae.safetensors", {k: v.bfloat16() for k, v in raw.items()})
    assert load_sae(tmp_path / "layers.2").dtype == torch.bfloat16
    assert load_sae(tmp_path / "layers.2", dtype="float32").dtype == torch.float32


# --------------------------------------------------------------------------- dictionary_learning


def dictionary_learning_reference(dict_class: str, s: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    if dict_class == "AutoEncoder":
        f = torch.relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
        return f, f @ s["decoder.weight"].T + s["bias"]
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = torch.relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        f = (
            topk_scatter(post, int(s["k"]))
            if dict_class == "AutoEncoderTopK"
            else post * (post > s["threshold"])
        )
        return f, f @ s["decoder.weight"].T + s["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        post = torch.relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = post * (post > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    pre = x @ s["W_enc"] + s["b_enc"]  # JumpReluAutoEncoder
    norms = s["W_dec"].norm(dim=1)
    f = torch.relu(pre * (pre > s["threshold"])) * norms
    return f, (f / norms) @ s["W_dec"] + s["b_dec"]


DL_CLASSES = [
    "AutoEncoder",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "MatryoshkaBatchTopKSAE",
    "JumpReluAutoEncoder",
]


@pytest.mark.parametrize("dict_class", DL_CLASSES)
@pytest.mark.parametrize("with_config", [True, False])
def test_dictionary_learning_classes(tmp_path: Path, dict_class: str, with_config: bool) -> None:
    state = write_dictionary_learning(tmp_path / "trainer_0", dict_class, write_config=with_config)
    sae = load_sae(tmp_path / "trainer_0")
    x = inputs()
    # BatchTopKSAE and AutoEncoderTopK save the same tensors: without config.json, TopK inference is assumed.
    expected_class = "AutoEncoderTopK" if dict_class == "BatchTopKSAE" and not with_config else dict_class
    assert_matches(sae, x, *dictionary_learning_reference(expected_class, state, x))
    assert sae.cfg.metadata["dict_class"] == expected_class
    if with_config:
        assert sae.cfg.hook_site == "blocks.3.hook_resid_post"
        assert sae.cfg.model_name == "tiny-model"


def test_dictionary_learning_unset_batch_threshold_falls_back_to_topk(tmp_path: Path) -> None:
    state = write_dictionary_learning(tmp_path / "t", "BatchTopKSAE", threshold=-1.0)
    sae = load_sae(tmp_path / "t")
    assert sae.cfg.activation == "topk" and sae.cfg.metadata["threshold_unset"] is True
    x = inputs()
    post = torch.relu((x - state["b_dec"]) @ state["encoder.weight"].T + state["encoder.bias"])
    torch.testing.assert_close(sae.encode(x), topk_scatter(post, 4), atol=ATOL, rtol=RTOL)


def test_dictionary_learning_backup_dict_uses_norm_factor(tmp_path: Path) -> None:
    state = write_dictionary_learning(
        tmp_path / "t", "AutoEncoderTopK", backup_norm_factor=4.0, write_config=False
    )
    sae = load_sae(tmp_path / "t" / "ae.pt")
    assert sae.cfg.input_scale == 0.25
    x = inputs()
    codes, recon = dictionary_learning_reference("AutoEncoderTopK", state, x / 4.0)
    assert_matches(sae, x, codes, recon * 4.0)
    assert sae.cfg.hook_site == "blocks.3.hook_resid_post"  # trainer config from the backup


def test_dictionary_learning_config_contradicting_tensors(tmp_path: Path) -> None:
    write_dictionary_learning(tmp_path / "t", "AutoEncoder", config={"dict_size": 64})
    with pytest.raises(SAEFormatError, match="dict_size=64"):
        load_sae(tmp_path / "t")


def test_dictionary_learning_gated_is_refused(tmp_path: Path) -> None:
    write_dictionary_learning(tmp_path / "t", "GatedAutoEncoder")
    with pytest.raises(SAEFormatError, match="gated"):
        load_sae(tmp_path / "t")


@pytest.mark.parametrize("name", ["ae.pt", "12.pt"])
def test_malicious_pickle_is_never_executed(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"encoder.weight": torch.zeros(2, 2), "payload": Exploit(marker)}, folder / name)
    torch.load(folder / name, weights_only=False)  # proves the payload is live under plain unpickling
    assert marker.exists()
    marker.unlink()
    with pytest.raises(SAEFormatError, match="refused to unpickle"):
        load_sae(folder / name)
    assert not marker.exists()


def test_truncated_pickle(tmp_path: Path) -> None:
    write_dictionary_learning(tmp_path / "t", "AutoEncoder")
    truncate(tmp_path / "t" / "ae.pt", 0.6)
    with pytest.raises(SAEFormatError, match=r"ae\.pt: corrupt or truncated torch file"):
        load_sae(tmp_path / "t")


# --------------------------------------------------------------------------- OpenAI


def openai_reference(s: dict[str, Any], x: Tensor) -> tuple[Tensor, Tensor]:
    topk = s["activation"] == "TopK"
    mu = std = None
    if topk:
        mu = x.mean(-1, keepdim=True)
        xc = x - mu
        std = xc.std(-1, keepdim=True)
        x = xc / (std + 1e-5)
    pre = (x - s["pre_bias"]) @ s["encoder.weight"].T + s["latent_bias"]
    if topk:
        vals, idx = pre.topk(s["activation_state_dict"]["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    else:
        f = torch.relu(pre)
    recon = f @ s["decoder.weight"].T + s["pre_bias"]
    return f, (recon * std + mu if topk else recon)


@pytest.mark.parametrize("activation", ["TopK", "ReLU"])
def test_openai_matches_its_equations(tmp_path: Path, activation: str) -> None:
    file = tmp_path / "resid_post_mlp_v5_32k" / "autoencoders" / "7.pt"
    state = write_openai(file, activation=activation)
    sae = load_sae(file)
    x = inputs()
    assert_matches(sae, x, *openai_reference(state, x))
    assert sae.cfg.source_format == "openai"
    assert sae.cfg.hook_site == "blocks.7.hook_resid_post"
    assert sae.cfg.normalize == ("layer_norm" if activation == "TopK" else "none")


def test_openai_layer_folder_by_hookpoint(tmp_path: Path) -> None:
    folder = tmp_path / "resid_delta_attn_v5_32k" / "autoencoders"
    for layer in (0, 1):
        write_openai(folder / f"{layer}.pt", seed=layer)
    sae = load_sae(folder, hookpoint="1")
    assert sae.cfg.hook_site == "blocks.1.hook_attn_out"
    with pytest.raises(SAEFormatError, match="Available: 0, 1"):
        load_sae(folder)


# --------------------------------------------------------------------------- detection and round trips


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "saelens": lambda p: (write_saelens(p / "s", architecture="topk", k=5, normalize="layer_norm"), p / "s")[
        1
    ],
    "gemma_scope": lambda p: (write_gemma_scope(p / "g" / "params.npz"), p / "g")[1],
    "gemma_scope_2": lambda p: (write_gemma_scope_2(p / "g2"), p / "g2")[1],
    "llama_scope": lambda p: (write_llama_scope(p / "l"), p / "l")[1],
    "llamascopium": lambda p: (write_llamascopium(p / "l2"), p / "l2")[1],
    "sparsify": lambda p: (write_sparsify(p / "layers.3"), p / "layers.3")[1],
    "dictionary_learning": lambda p: (write_dictionary_learning(p / "d", "BatchTopKSAE"), p / "d")[1],
    "openai": lambda p: (write_openai(p / "o" / "3.pt"), p / "o" / "3.pt")[1],
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_detection_and_round_trip_through_saelens_layout(tmp_path: Path, name: str) -> None:
    path = BUILDERS[name](tmp_path)
    fmt = detect_format(path)
    assert fmt is not None and fmt.name == name
    sae = load_sae(path)
    out = save_sae(sae, tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    again = load_sae(out)
    x = inputs(32)
    if sae.cfg.input_scale == 1.0:
        assert torch.equal(again(x), sae(x))
        assert torch.equal(again.encode(x), sae.encode(x))
    else:  # folded into the weights: equal up to rounding
        torch.testing.assert_close(again(x), sae(x), atol=1e-5, rtol=1e-5)
    assert again.cfg.activation == sae.cfg.activation and again.cfg.k == sae.cfg.k
    assert again.cfg.hook_site == sae.cfg.hook_site and again.cfg.normalize == sae.cfg.normalize
    assert again.cfg.metadata["converted_from"] == name
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] in ("standard", "jumprelu", "topk") and "metadata" in cfg


def test_saved_batchtopk_is_a_saelens_jumprelu_with_per_latent_threshold(tmp_path: Path) -> None:
    sae = load_sae(BUILDERS["dictionary_learning"](tmp_path))
    assert sae.cfg.activation == "batchtopk"
    save_sae(sae, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    weights = safetensors.torch.load_file(str(tmp_path / "out" / "sae_weights.safetensors"))
    assert cfg["architecture"] == "jumprelu"
    assert weights["threshold"].shape == (D_SAE,)
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"


def test_saves_declare_a_v6_config_so_saelens_keeps_the_names(tmp_path: Path) -> None:
    # SAELens reads a cfg.json without metadata.sae_lens_version >= 6 as pre-6 and drops the nested names
    write_saelens(tmp_path / "old", v6=False, extra_cfg={"sae_lens_version": "3.1.0"})
    write_saelens(
        tmp_path / "new",
        extra_cfg={"metadata": {"hook_name": "blocks.3.hook_resid_post", "sae_lens_version": "6.18.0"}},
    )
    for src, version in (("old", "6.0.0"), ("new", "6.18.0")):
        out = save_sae(load_sae(tmp_path / src), tmp_path / f"{src}-saved")
        meta = json.loads((out / "cfg.json").read_text())["metadata"]
        assert meta["sae_lens_version"] == version
        assert meta["hook_name"] == "blocks.3.hook_resid_post"
        assert meta["model_name"] == ("tiny-model" if src == "old" else None)


def test_a_model_name_with_a_note_is_saved_as_its_id_and_restored(tmp_path: Path) -> None:
    sae = load_sae(BUILDERS["sparsify"](tmp_path))
    sae.cfg.model_name = "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)"
    out = save_sae(sae, tmp_path / "out")
    assert json.loads((out / "cfg.json").read_text())["metadata"]["model_name"] == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert load_sae(out).cfg.model_name == sae.cfg.model_name


def test_saving_onto_a_file_is_a_format_error(tmp_path: Path) -> None:
    sae = load_sae(BUILDERS["sparsify"](tmp_path))
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(SAEFormatError, match="Cannot write"):
        save_sae(sae, tmp_path / "taken")


def test_member_file_paths_load_their_folder(tmp_path: Path) -> None:
    write_saelens(tmp_path / "s")
    assert load_sae(tmp_path / "s" / "cfg.json").cfg.source_format == "saelens"
    write_llama_scope(tmp_path / "l")
    assert load_sae(tmp_path / "l" / "checkpoints" / "final.safetensors").cfg.source_format == "llama_scope"


def test_explicit_format_overrides_detection_and_unknown_names_fail(tmp_path: Path) -> None:
    write_sparsify(tmp_path / "layers.3")
    assert load_sae(tmp_path / "layers.3", format="sparsify").cfg.k == 4
    with pytest.raises(SAEFormatError, match="Unknown SAE format 'sae_lens'"):
        load_sae(tmp_path / "layers.3", format="sae_lens")
    with pytest.raises(SAEFormatError, match=r"Cannot load .* as saelens"):
        load_sae(tmp_path / "layers.3", format="saelens")


# --------------------------------------------------------------------------- damaged and unknown input


def test_truncated_safetensors_names_the_file(tmp_path: Path) -> None:
    write_saelens(tmp_path / "s")
    truncate(tmp_path / "s" / "sae_weights.safetensors", 0.5)
    with pytest.raises(SAEFormatError, match=r"sae_weights\.safetensors: corrupt or truncated safetensors"):
        load_sae(tmp_path / "s")


def test_corrupt_npz_names_the_file(tmp_path: Path) -> None:
    write_gemma_scope(tmp_path / "g" / "params.npz")
    truncate(tmp_path / "g" / "params.npz", 0.4)
    with pytest.raises(SAEFormatError, match=r"params\.npz: corrupt or truncated \.npz"):
        load_sae(tmp_path / "g")
    np.savez(tmp_path / "g" / "params.npz", W_enc=np.array([object()], dtype=object))
    with pytest.raises(SAEFormatError, match=r"params\.npz"):
        load_sae(tmp_path / "g")


def test_nan_weights_are_a_data_error_naming_the_tensor(tmp_path: Path) -> None:
    raw = write_sparsify(tmp_path / "layers.1")
    raw["encoder.bias"][5] = float("inf")
    write_safetensors(tmp_path / "layers.1" / "sae.safetensors", raw)
    with pytest.raises(DataError, match="b_enc"):
        load_sae(tmp_path / "layers.1")


def test_bad_json_names_the_file(tmp_path: Path) -> None:
    write_saelens(tmp_path / "s")
    (tmp_path / "s" / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFormatError, match=r"cfg\.json: not a readable JSON"):
        load_sae(tmp_path / "s")


@pytest.mark.parametrize(
    ("writer", "file", "patch", "message"),
    [
        (write_sparsify, "cfg.json", {"d_in": "eight"}, "d_in must be a positive integer"),
        (write_sparsify, "cfg.json", {"num_latents": 0, "expansion_factor": {"x": 1}}, "expansion_factor"),
        (write_saelens, "cfg.json", {"d_sae": -3}, "d_sae must be a positive integer"),
        (write_saelens, "cfg.json", {"architecture": "transcoder"}, "architecture 'transcoder'"),
    ],
)
def test_bad_config_values_are_format_errors(
    tmp_path: Path, writer: Callable[..., Any], file: str, patch: dict[str, Any], message: str
) -> None:
    writer(tmp_path / "layers.1")
    cfg = json.loads((tmp_path / "layers.1" / file).read_text())
    write_json(tmp_path / "layers.1" / file, {**cfg, **patch})
    with pytest.raises(SAEFormatError, match=message):
        load_sae(tmp_path / "layers.1")


def test_unknown_layout_lists_what_was_found_and_what_is_known(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "weights.bin").write_bytes(b"\0")
    with pytest.raises(SAEFormatError) as info:
        load_sae(tmp_path / "x")
    message = str(info.value)
    assert "weights.bin" in message and "Known layouts" in message
    assert all(name in message for name in BUILDERS)


def test_wrong_model_width_is_a_shape_error(tmp_path: Path) -> None:
    sae = load_sae(BUILDERS["sparsify"](tmp_path))
    with pytest.raises(ShapeError, match=r"blocks\.3\.hook_resid_post"):
        sae.check_input_width(16, "blocks.3.hook_resid_post")


def test_hub_ids_need_online(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SAEFormatError, match="online=True"):
        load_sae("EleutherAI/sae-tiny:layers.3")
    with pytest.raises(SAEFormatError, match="no such file"):
        load_sae(str(tmp_path / "missing" / "a" / "b"))
    snapshot = tmp_path / "snapshot"
    write_sparsify(snapshot / "layers.3")
    calls: list[dict[str, Any]] = []

    def fake_snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    sae = load_sae("EleutherAI/sae-tiny:layers.3", online=True)
    assert calls == [{"repo_id": "EleutherAI/sae-tiny", "allow_patterns": ["layers.3/*"]}]
    assert sae.cfg.hook_site == "blocks.3.hook_resid_post"


@pytest.mark.parametrize(
    ("name", "site"),
    [
        ("blocks.4.hook_mlp_out", "blocks.4.hook_mlp_out"),
        ("layers.10", "blocks.10.hook_resid_post"),
        ("model.layers.3.output", "blocks.3.hook_resid_post"),
        ("gpt_neox.layers.2", "blocks.2.hook_resid_post"),
        ("transformer.h.11", "blocks.11.hook_resid_post"),
        ("model.layers.5.post_feedforward_layernorm.output", "blocks.5.hook_mlp_out"),
        ("layers.10.mlp", None),
        ("embed_tokens", None),
        (None, None),
    ],
)
def test_canonical_hook_sites(name: str | None, site: str | None) -> None:
    assert canonical_hook_site(name) == site


# --------------------------------------------------------------------------- CLI


def test_cli_inspect_text_and_json(tmp_path: Path) -> None:
    path = BUILDERS["gemma_scope_2"](tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    for expected in (
        "gemma_scope_2",
        "jumprelu",
        "d_in:",
        "32",
        "blocks.4.hook_resid_post",
        "float32",
        "median",
    ):
        assert expected in result.output
    result = runner.invoke(app, ["inspect", str(path), "--json"])
    data = json.loads(result.output)
    assert data["d_in"] == D_IN and data["d_sae"] == D_SAE and data["architecture"] == "jumprelu"
    assert data["threshold"]["min"] <= data["threshold"]["median"] <= data["threshold"]["max"]


def test_cli_convert_then_load_gives_the_same_sae(tmp_path: Path) -> None:
    src = BUILDERS["openai"](tmp_path)
    result = CliRunner().invoke(app, ["convert", str(src), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    x = inputs()
    assert torch.equal(load_sae(tmp_path / "out")(x), load_sae(src)(x))


def test_cli_errors_are_darkmatter_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "empty")])
    assert result.exit_code != 0
    assert isinstance(result.exception, SAEFormatError)
