"""Hook sites read the right tensors on every checked architecture; splicing is exact elsewhere."""

from __future__ import annotations

import pytest
import torch

from darkmatter.errors import HookSiteError
from darkmatter.lm.hooks import capture, run, splice
from darkmatter.lm.sites import parse_site, validate_sites

from conftest import DISCOVERED_ARCHS, tiny_model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 60, (2, 24), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", DISCOVERED_ARCHS)
def test_resid_post_equals_hidden_states(arch: str) -> None:
    model = tiny_model(arch)
    ids = _ids()
    sites = [f"blocks.{layer}.hook_resid_post" for layer in range(2)]  # the last layer's entry is normed
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        with capture(model, sites) as cap:
            run(model, input_ids=ids)
    for layer, site in enumerate(sites):
        torch.testing.assert_close(cap.acts[site], ref[layer + 1], rtol=0, atol=0)


@pytest.mark.parametrize("arch", DISCOVERED_ARCHS)
def test_components_sum_to_resid_post(arch: str) -> None:
    model = tiny_model(arch)
    kinds = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]
    sites = [f"blocks.1.{k}" for k in kinds]
    with torch.no_grad(), capture(model, sites) as cap:
        run(model, input_ids=_ids())
    pre, attn, mlp, post = (cap.acts[s] for s in sites)
    torch.testing.assert_close(pre + attn + mlp, post, rtol=1e-5, atol=1e-5)
    # resid_pre of layer 1 is resid_post of layer 0
    assert attn.abs().sum() > 0 and mlp.abs().sum() > 0


def test_stop_early_skips_later_layers() -> None:
    model = tiny_model("llama", n_layers=4)
    calls: list[int] = []
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(lambda *_a, i=i: calls.append(i))
    with torch.no_grad(), capture(model, ["blocks.1.hook_resid_post"], stop_early=True) as cap:
        out = run(model, input_ids=_ids())
    assert out is None and cap.stopped_early
    assert calls == [0, 1]


@pytest.mark.parametrize("kind", ["hook_resid_post", "hook_resid_pre", "hook_mlp_out", "hook_attn_out"])
def test_splice_identity_is_bit_exact_and_replacement_is_local(kind: str) -> None:
    model = tiny_model("llama")
    ids = _ids(1)
    site = f"blocks.1.{kind}"
    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with splice(model, site, lambda x: x.clone(), start=5):
            same = model(input_ids=ids).logits
        with splice(model, site, lambda x: torch.zeros_like(x), start=5):
            zeroed = model(input_ids=ids).logits
    assert torch.equal(clean, same)
    assert torch.equal(clean[:, :5], zeroed[:, :5])  # causal: earlier positions untouched
    assert not torch.allclose(clean[:, 5:], zeroed[:, 5:])


def test_splice_mask_selects_positions() -> None:
    model = tiny_model("gpt2")
    ids = _ids(2)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[0, 10] = True
    seen: list[int] = []

    def rep(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x + 1.0

    with torch.no_grad():
        clean = model(input_ids=ids).logits
        with splice(model, "blocks.0.hook_resid_post", rep, mask=mask):
            new = model(input_ids=ids).logits
    assert seen == [1]
    assert torch.equal(clean[1], new[1]) and torch.equal(clean[0, :10], new[0, :10])
    assert not torch.allclose(clean[0, 10:], new[0, 10:])


def test_site_errors() -> None:
    model = tiny_model("llama")
    with pytest.raises(HookSiteError, match="layer 7"):
        validate_sites(model, ["blocks.7.hook_resid_post"])
    with pytest.raises(HookSiteError, match="Unknown hook site"):
        parse_site("blocks.1.hook_z")
    assert parse_site("layers.4").name == "blocks.4.hook_resid_post"
