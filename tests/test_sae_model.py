"""The canonical SAE: equations, sparse == dense, chunking, transforms, validation, dtypes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from darkmatter.errors import ConfigError, DataError, SAEFormatError, ShapeError
from darkmatter.sae import SAE, SAEConfig, SparseCodes

from sae_helpers import D_IN, D_SAE, canonical_tensors, inputs


def make_sae(activation: str = "relu", *, k: int | None = None, seed: int = 0, **cfg_kwargs: object) -> SAE:
    tensors = canonical_tensors(seed, threshold=activation in ("jumprelu", "batchtopk"))
    if activation == "topk" and k is None:
        k = 4
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, activation=activation, k=k, **cfg_kwargs)  # type: ignore[arg-type]
    return SAE.from_tensors(cfg, tensors)


def reference_codes(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """The module docstring's equations, written out (float64)."""
    c = sae.cfg
    W_enc, b_enc, b_dec = (t.double() for t in (sae.W_enc, sae.b_enc, sae.b_dec))
    xd = x.double()
    if c.normalize == "layer_norm":
        mu = xd.mean(-1, keepdim=True)
        xd = (xd - mu) / ((xd - mu).std(-1, keepdim=True) + 1e-5)
    elif c.normalize == "constant_norm_rescale":
        xd = xd * math.sqrt(c.d_in) / xd.norm(dim=-1, keepdim=True)
    xd = xd * c.input_scale
    if c.apply_b_dec_to_input:
        xd = xd - b_dec
    pre = xd @ W_enc + b_enc
    if c.activation == "relu":
        return torch.relu(pre)
    if c.activation in ("jumprelu", "batchtopk"):
        assert sae.threshold is not None
        return torch.relu(pre) * (pre > sae.threshold.double())
    vals, idx = pre.topk(c.k, dim=-1)  # type: ignore[arg-type]
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))


def reference_recon(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    c = sae.cfg
    y = (reference_codes(sae, x) @ sae.W_dec.double() + sae.b_dec.double()) / c.input_scale
    xd = x.double()
    if c.normalize == "layer_norm":
        mu = xd.mean(-1, keepdim=True)
        y = y * (xd - mu).std(-1, keepdim=True) + mu  # OpenAI/SAELens undo the LayerNorm without eps
    elif c.normalize == "constant_norm_rescale":
        y = y * xd.norm(dim=-1, keepdim=True) / math.sqrt(c.d_in)
    return y


ALL_ACTIVATIONS = ["relu", "jumprelu", "topk", "batchtopk"]
VARIANTS = [
    {},
    {"apply_b_dec_to_input": False},
    {"input_scale": 2.5},
    {"normalize": "layer_norm"},
    {"normalize": "constant_norm_rescale", "input_scale": 0.7},
]


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
@pytest.mark.parametrize(
    "variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "plain"
)
def test_encode_and_forward_follow_the_equations(activation: str, variant: dict[str, Any]) -> None:
    sae = make_sae(activation, **variant)
    x = inputs()
    codes = sae.encode(x)
    torch.testing.assert_close(codes.double(), reference_codes(sae, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sae(x).double(), reference_recon(sae, x), atol=1e-4, rtol=1e-4)
    assert (codes != 0).any() and (codes == 0).any()


def test_jumprelu_is_relu_then_mask_even_with_negative_thresholds() -> None:
    sae = make_sae("jumprelu")
    assert sae.threshold is not None
    sae.threshold.data.fill_(-5.0)  # every pre-activation passes the mask
    codes = sae.encode(inputs())
    assert codes.min() >= 0  # relu first: negative pre-activations give 0, not negative codes
    torch.testing.assert_close(codes, torch.relu(sae.pre_activations(inputs())))


def test_topk_keeps_exactly_k_when_pre_activations_are_positive() -> None:
    sae = make_sae("topk", k=5)
    sae.b_enc.data.fill_(100.0)
    assert torch.equal(sae.encode_sparse(inputs()).l0(), torch.full((16,), 5))


@settings(max_examples=40, deadline=None)
@given(
    activation=st.sampled_from(ALL_ACTIVATIONS),
    n=st.integers(0, 20),
    chunk=st.one_of(st.none(), st.integers(1, 25)),
    seed=st.integers(0, 10_000),
    normalize=st.sampled_from(["none", "layer_norm"]),
)
def test_sparse_path_equals_dense_path(
    activation: str, n: int, chunk: int | None, seed: int, normalize: str
) -> None:
    sae = make_sae(activation, seed=seed % 7, normalize=normalize, input_scale=1.5)
    x = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed))
    dense = sae.encode(x, chunk_size=chunk)
    codes = sae.encode_sparse(x, chunk_size=chunk)
    assert codes.indices.dtype == torch.int64
    torch.testing.assert_close(codes.to_dense(D_SAE), dense)
    assert torch.equal(codes.l0(), (dense != 0).sum(-1))
    stats = sae.input_stats(x)
    torch.testing.assert_close(
        sae.decode_sparse(codes, stats=stats), sae.decode(dense, stats=stats), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(sae.encode(x), dense)  # chunking changes nothing


def test_sparse_width_and_padding() -> None:
    sae = make_sae("jumprelu")
    x = inputs()
    codes = sae.encode_sparse(x, chunk_size=3)
    l0 = codes.l0()
    assert codes.width == int(l0.max())
    padded = codes.values == 0
    assert padded.any()  # rows with fewer active latents are padded
    assert torch.equal(codes.indices[padded], torch.zeros_like(codes.indices[padded]))
    topk = make_sae("topk", k=3).encode_sparse(x, chunk_size=5)
    assert topk.width == 3


def test_leading_batch_dimensions_are_kept() -> None:
    sae = make_sae("topk", normalize="layer_norm")
    x = inputs(24).reshape(2, 3, 4, D_IN)
    assert sae.encode(x).shape == (2, 3, 4, D_SAE)
    codes = sae.encode_sparse(x)
    assert codes.indices.shape == (2, 3, 4, 4)
    x_hat, _ = sae.reconstruct(x)
    assert x_hat.shape == x.shape
    torch.testing.assert_close(x_hat.reshape(-1, D_IN), sae(x.reshape(-1, D_IN)))


def test_decode_without_stats_refuses_when_the_input_was_normalized() -> None:
    sae = make_sae("relu", normalize="layer_norm")
    with pytest.raises(ConfigError, match="input_stats"):
        sae.decode(sae.encode(inputs()))


def test_decode_sparse_with_no_active_latents_returns_the_bias() -> None:
    sae = make_sae("relu")
    codes = SparseCodes(indices=torch.zeros(3, 0, dtype=torch.long), values=torch.zeros(3, 0))
    torch.testing.assert_close(sae.decode_sparse(codes), sae.b_dec.expand(3, -1))


@pytest.mark.parametrize("scale", [2.0, 0.37])
@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_fold_input_scale_is_equivalent(activation: str, scale: float) -> None:
    sae = make_sae(activation, input_scale=scale, apply_b_dec_to_input=True)
    folded = sae.fold_input_scale()
    assert folded.cfg.input_scale == 1.0 and sae.cfg.input_scale == scale
    x = inputs()
    torch.testing.assert_close(folded(x), sae(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded.encode(x), sae.encode(x), atol=1e-5, rtol=1e-5)
    if scale == 2.0:  # a power of two: the rewrite is exact in floating point too
        assert torch.equal(folded.encode(x), sae.encode(x))
    torch.testing.assert_close(folded.W_enc, sae.W_enc * scale)
    torch.testing.assert_close(folded.W_dec, sae.W_dec / scale)


def test_validate_names_the_non_finite_tensor() -> None:
    tensors = canonical_tensors()
    tensors["W_dec"][3, 2] = float("nan")
    with pytest.raises(DataError, match="W_dec"):
        SAE.from_tensors(SAEConfig(d_in=D_IN, d_sae=D_SAE), tensors)


def test_validate_rejects_shapes_that_contradict_the_config() -> None:
    tensors = canonical_tensors()
    tensors["W_enc"] = tensors["W_enc"].T.contiguous()
    with pytest.raises(SAEFormatError, match=r"W_enc has shape \(32, 8\).*requires \(8, 32\)"):
        SAE.from_tensors(SAEConfig(d_in=D_IN, d_sae=D_SAE), tensors)
    with pytest.raises(SAEFormatError, match="threshold"):
        SAE.from_tensors(SAEConfig(d_in=D_IN, d_sae=D_SAE, activation="jumprelu"), canonical_tensors())


def test_fp16_overflow_is_reported_as_data_error() -> None:
    tensors = canonical_tensors()
    tensors["b_enc"][0] = 1e6
    with pytest.raises(DataError, match="b_enc"):
        SAE.from_tensors(SAEConfig(d_in=D_IN, d_sae=D_SAE), tensors, dtype=torch.float16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"activation": "topk"}, "needs k"),
        ({"activation": "gelu"}, "unknown activation"),
        ({"activation": "relu", "k": 3}, "makes no sense"),
        ({"activation": "topk", "k": 99}, "exceeds d_sae"),
        ({"normalize": "rms"}, "unknown normalize"),
        ({"input_scale": 0.0}, "input_scale"),
        ({"d_in": 0}, "d_in"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict[str, object], message: str) -> None:
    base: dict[str, object] = {"d_in": D_IN, "d_sae": D_SAE}
    with pytest.raises(SAEFormatError, match=message):
        SAEConfig(**{**base, **kwargs})  # type: ignore[arg-type]


def test_config_dict_round_trip_and_unknown_keys() -> None:
    cfg = SAEConfig(
        d_in=4, d_sae=16, activation="topk", k=2, hook_site="blocks.1.hook_resid_post", metadata={"a": [1]}
    )
    again = SAEConfig.from_dict(cfg.to_dict())
    assert again == cfg
    again.metadata["a"].append(2)
    assert cfg.metadata == {"a": [1]}  # a deep copy
    with pytest.raises(SAEFormatError, match="unknown keys"):
        SAEConfig.from_dict({**cfg.to_dict(), "threshold": 1.0})


def test_check_input_width() -> None:
    sae = make_sae("relu", hook_site="blocks.3.hook_resid_post")
    sae.check_input_width(D_IN, "blocks.3.hook_resid_post")
    with pytest.raises(
        ShapeError, match=r"d_in=8.*blocks\.3\.hook_resid_post.*'blocks\.7\.hook_mlp_out' has width 16"
    ):
        sae.check_input_width(16, "blocks.7.hook_mlp_out")
    with pytest.raises(ShapeError, match="last dimension 8"):
        sae.encode(torch.zeros(2, 5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_compute_in_the_sae_dtype(dtype: torch.dtype) -> None:
    sae = make_sae("jumprelu", normalize="layer_norm", input_scale=1.5)
    low = sae.to(dtype=dtype)
    assert low.dtype == dtype and low.threshold is not None and low.threshold.dtype == dtype
    x = inputs()
    out = low(x)
    assert out.dtype == dtype
    codes = low.encode_sparse(x)
    assert codes.values.dtype == dtype
    tol = 1e-6 if dtype == torch.float64 else 0.2
    torch.testing.assert_close(
        out.float(), make_sae("jumprelu", normalize="layer_norm", input_scale=1.5)(x), atol=tol, rtol=tol
    )


def test_loaded_tensors_are_frozen_and_not_copied() -> None:
    tensors = canonical_tensors()
    sae = SAE.from_tensors(SAEConfig(d_in=D_IN, d_sae=D_SAE), tensors)
    assert not any(p.requires_grad for p in sae.parameters())
    assert sae.W_enc.data_ptr() == tensors["W_enc"].data_ptr()


def test_training_mode_gradients_flow_through_the_sparse_path() -> None:
    sae = make_sae("topk").requires_grad_(True)
    loss = (sae(inputs()) - inputs()).pow(2).sum()
    loss.backward()
    assert sae.W_dec.grad is not None and sae.W_enc.grad is not None
    assert sae.W_enc.grad.abs().sum() > 0


def test_zero_initialised_constructor_matches_config() -> None:
    sae = SAE(SAEConfig(d_in=3, d_sae=5, activation="batchtopk"), dtype=torch.float64)
    assert sae.threshold is not None and sae.threshold.shape == (5,) and sae.dtype == torch.float64
    assert SAE(SAEConfig(d_in=3, d_sae=5)).threshold is None


def test_summary_reports_threshold_spread() -> None:
    sae = make_sae("jumprelu", hook_site="blocks.3.hook_resid_post")
    summary = sae.summary()
    assert sae.threshold is not None
    assert summary["threshold"]["min"] == pytest.approx(float(sae.threshold.min()))
    assert summary["threshold"]["max"] == pytest.approx(float(sae.threshold.max()))
    assert summary["hook_site"] == "blocks.3.hook_resid_post"
    assert summary["dtype"] == "float32"


def test_replace_keeps_config_checks() -> None:
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE)
    with pytest.raises(SAEFormatError):
        dataclasses.replace(cfg, activation="topk")


class WideAllocations(TorchDispatchMode):
    """Records every distinct tensor storage of at least ``numel`` elements that an op produces."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel = numel
        self.storages: dict[int, tuple[torch.dtype, int]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.numel() >= self.numel:
                self.storages[leaf.untyped_storage().data_ptr()] = (leaf.dtype, leaf.numel())
        return out


@pytest.mark.parametrize("activation", ALL_ACTIVATIONS)
def test_encode_sparse_keeps_one_wide_tensor(activation: str) -> None:
    sae = make_sae(activation)
    x = inputs(64)
    wide = 64 * D_SAE
    with torch.no_grad(), WideAllocations(wide) as seen:
        sae.encode_sparse(x)
    float_storages = [v for v in seen.storages.values() if v[0].is_floating_point or v[0] == torch.int64]
    assert len(float_storages) == 1, seen.storages  # the pre-activations, activated in place
    with torch.no_grad(), WideAllocations(16 * D_SAE + 1) as chunked:
        codes = sae.encode_sparse(x, chunk_size=16)
    returned = {t.untyped_storage().data_ptr() for t in (codes.indices, codes.values)}
    assert set(chunked.storages) <= returned  # nothing wider than one chunk except the packed result


def test_layer_norm_matches_openai_on_tiny_activations() -> None:
    """With std ~ 1e-4 the eps matters: in on (std + eps), out on std, as OpenAI's LN / decode do."""
    sae = make_sae("topk", normalize="layer_norm")
    x = inputs() * 1e-4
    mu = x.double().mean(-1, keepdim=True)
    std = (x.double() - mu).std(-1, keepdim=True)
    xn = (x.double() - mu) / (std + 1e-5) - sae.b_dec.double()
    f = torch.relu(topk_dense(xn @ sae.W_enc.double() + sae.b_enc.double(), 4))
    expected = (f @ sae.W_dec.double() + sae.b_dec.double()) * std + mu
    torch.testing.assert_close(sae(x).double(), expected, atol=1e-9, rtol=1e-5)


def topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, vals)
