"""The blocked exact top-k equals ``Tensor.topk``: values exactly, indices up to ties, gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from darkmatter.sae.topk import block_size, topk


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 40),
    width=st.sampled_from([64, 96, 256, 512, 1000, 1024, 2048, 4096]),
    k=st.sampled_from([1, 4, 16, 32, 64]),
    ties=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_values_equal_plain_topk_and_indices_point_at_them(
    n: int, width: int, k: int, ties: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(n, width, generator=g)
    if ties:  # few distinct values: many exact ties, and whole rows of equal values
        pre = pre.mul(2).round()
        pre[: n // 3] = -1.0
    values, indices = topk(pre, k)
    ref = pre.topk(k, dim=-1, sorted=False).values
    assert torch.equal(values.sort(-1).values, ref.sort(-1).values)
    assert torch.equal(pre.gather(1, indices), values)
    assert all(len(set(row.tolist())) == k for row in indices)  # k distinct columns per row


def test_the_blocked_path_is_taken_for_wide_rows() -> None:
    assert block_size(4096, 32) == 8 and block_size(1024, 32) == 4
    assert block_size(100, 32) == 0 and block_size(1001, 4) == 0  # too short / not divisible


def test_a_row_whose_top_entries_share_one_block() -> None:
    width, k = 1024, 8
    pre = torch.full((1, width), -5.0)
    blocks = width // block_size(width, k)
    pre[0, 3::blocks] = torch.arange(4.0)  # one strided block holds 4 of the 8 largest
    pre[0, [10, 20, 30, 40]] = 10.0
    values, indices = topk(pre, k)
    assert sorted(values[0].tolist()) == [0.0, 1.0, 2.0, 3.0, 10.0, 10.0, 10.0, 10.0]
    assert set(indices[0].tolist()) == {3, 3 + blocks, 3 + 2 * blocks, 3 + 3 * blocks, 10, 20, 30, 40}


@pytest.mark.parametrize("width", [512, 4096])
def test_gradient_flows_to_the_chosen_entries_as_with_plain_topk(width: int) -> None:
    pre = torch.randn(8, width, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weights = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    values, indices = topk(pre, 32)
    order = indices.argsort(-1)
    (values.gather(1, order) * weights).sum().backward()
    ours = pre.grad.clone()
    pre.grad = None
    ref_values, ref_indices = pre.topk(32, dim=-1, sorted=False)
    ref_order = ref_indices.argsort(-1)
    (ref_values.gather(1, ref_order) * weights).sum().backward()
    assert torch.equal(ours, pre.grad)
