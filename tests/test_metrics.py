"""Streaming metric objects against direct formulas: hand-written 2x4 tensors and streaming == batch."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from darkmatter.errors import DataError, ShapeError
from darkmatter.stats import FVU, L0, NMSE, Cosine, ExplainedVariance, NormRatio, ScalarR2

F64 = torch.float64
PROPS = settings(max_examples=40, deadline=None, derandomize=True)

X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [2.0, 0.0, 1.0, 1.0]])
X_HAT = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 1.0, 0.0, 1.0]])
LATENTS = torch.tensor([[0.0, 1.5, 0.0, 2.0], [0.0, 0.0, 0.0, 3.0]])


def test_names_match_the_architecture() -> None:
    names = [m.name for m in (FVU, ExplainedVariance, NMSE, L0, Cosine, NormRatio, ScalarR2)]
    assert names == ["fvu", "explained_variance", "nmse", "l0", "cosine", "norm_ratio", "r2"]


def test_hand_written_2x4_values() -> None:
    # Squared errors per token: 2 and 2; x̄ = [1.5, 1, 2, 2.5] so Σ‖x − x̄‖² = 2 · (0.25 + 1 + 1 + 2.25) = 9.
    fvu, ev = FVU(4), ExplainedVariance(4)
    nmse, ratio, cos = NMSE(4), NormRatio(4), Cosine(4)
    for m in (fvu, ev, nmse, ratio):
        m.update(X, X_HAT)
    cos.update(X, X_HAT)
    assert math.isclose(fvu.compute(), 4 / 9, rel_tol=1e-15)
    assert math.isclose(ev.compute(), 5 / 9, rel_tol=1e-15)
    assert math.isclose(nmse.compute(), (2 / 30 + 2 / 6) / 2, rel_tol=1e-15)
    assert math.isclose(ratio.compute(), (math.sqrt(20 / 30) + 1) / 2, rel_tol=1e-15)
    assert math.isclose(cos.compute(), (24 / math.sqrt(600) + 5 / 6) / 2, rel_tol=1e-15)
    assert cos.zero_norm_tokens == 0
    l0 = L0(4)
    l0.update(LATENTS)
    assert l0.compute() == 1.5
    assert l0.fire_counts.tolist() == [0, 1, 0, 2]
    assert l0.dead_fraction() == 0.5
    r2 = ScalarR2()
    r2.update(torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([1.0, 3.0, 3.0, 5.0]))
    assert math.isclose(r2.compute(), 1 - 1 / 8, rel_tol=1e-15)  # ȳ = 3, SS_tot = 8, SS_res = 1


def test_l0_sparse_update_equals_dense() -> None:
    sparse = L0(4)
    sparse.update_sparse(torch.tensor([[1, 3], [3, 0]]), torch.tensor([[1.5, 2.0], [3.0, 0.0]]))
    assert sparse.compute() == 1.5
    assert sparse.fire_counts.tolist() == [0, 1, 0, 2]
    with pytest.raises(ShapeError, match=r"\[0, 4\)"):
        sparse.update_sparse(torch.tensor([[4]]), torch.tensor([[1.0]]))


def test_fvu_uses_the_mean_over_all_tokens_not_per_chunk() -> None:
    # Per-chunk means would make each single-token chunk have zero variance.
    fvu = FVU(4)
    fvu.update(X[:1], X_HAT[:1])
    fvu.update(X[1:], X_HAT[1:])
    assert math.isclose(fvu.compute(), 4 / 9, rel_tol=1e-15)


def _direct(name: str, x: torch.Tensor, x_hat: torch.Tensor) -> float:
    if name == "fvu":
        return float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    if name == "nmse":
        return float((((x - x_hat) ** 2).sum(1) / (x**2).sum(1)).mean())
    if name == "norm_ratio":
        return float((x_hat.norm(dim=1) / x.norm(dim=1)).mean())
    if name == "cosine":
        return float(torch.nn.functional.cosine_similarity(x, x_hat, dim=1, eps=0).mean())
    y, y_hat = x[:, 0], x_hat[:, 0]
    return float(1 - ((y - y_hat) ** 2).sum() / ((y - y.mean()) ** 2).sum())


@PROPS
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(2, 120),
    cuts=st.lists(st.integers(0, 120), max_size=5),
    name=st.sampled_from(["fvu", "nmse", "norm_ratio", "cosine", "r2"]),
)
def test_streaming_and_merged_metrics_equal_batch_formulas(
    seed: int, n: int, cuts: list[int], name: str
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=F64) + 1e4 * (torch.arange(5) % 2)  # offsets exercise the shift
    x_hat = x + torch.randn(n, 5, generator=g, dtype=F64) * 0.5
    make: dict[str, Callable[[], Any]] = {"fvu": lambda: FVU(5), "nmse": lambda: NMSE(5)}
    make |= {"norm_ratio": lambda: NormRatio(5), "cosine": lambda: Cosine(5), "r2": ScalarR2}
    bounds = [0, *sorted(min(c, n) for c in cuts), n]
    streamed, merged = make[name](), make[name]()
    for a, b in itertools.pairwise(bounds):
        args = (x_hat[a:b, 0], x[a:b, 0]) if name == "r2" else (x[a:b], x_hat[a:b])
        streamed.update(*args)
        part, mid = make[name](), (b - a) // 3  # two sub-chunks: the part's reference is not its mean
        part.update(*(t[:mid] for t in args))
        part.update(*(t[mid:] for t in args))
        merged.merge(part)
    expected = _direct(name, x, x_hat)
    assert streamed.n == merged.n == n
    assert math.isclose(streamed.compute(), expected, rel_tol=1e-10)
    assert math.isclose(merged.compute(), expected, rel_tol=1e-10)


def test_metrics_state_dict_round_trip() -> None:
    fvu = FVU(4)
    fvu.update(X, X_HAT)
    clone = FVU(4)
    clone.load_state_dict(fvu.state_dict())
    assert clone.compute() == fvu.compute()
    l0 = L0(4)
    l0.update(LATENTS)
    l0_clone = L0(4)
    l0_clone.load_state_dict(l0.state_dict())
    assert l0_clone.fire_counts.tolist() == [0, 1, 0, 2]
    with pytest.raises(ShapeError, match="expected keys"):
        L0(5).load_state_dict(l0.state_dict())


def test_degenerate_metric_inputs() -> None:
    zero_row = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    with pytest.raises(DataError, match=r"1 token.*‖x‖ = 0"):
        NMSE(4).update(zero_row, zero_row)
    with pytest.raises(DataError, match="‖x‖ = 0"):
        NormRatio(4).update(zero_row, zero_row)
    cos = Cosine(4)
    cos.update(zero_row, X[[0, 0]])  # token 1: zero vector (cos := 0); token 2: identical vectors
    assert cos.zero_norm_tokens == 1
    assert math.isclose(cos.compute(), 0.5, rel_tol=1e-15)
    bad = X_HAT.clone()
    bad[1, 2] = math.nan
    fvu = FVU(4)
    with pytest.raises(DataError, match="fvu: x_hat in chunk 1 has 1 NaN/inf"):
        fvu.update(X, bad)
    assert fvu.n == 0
    with pytest.raises(DataError, match="no tokens"):
        fvu.compute()
    const = FVU(4)
    const.update(X[:1].repeat(3, 1), X_HAT[:1].repeat(3, 1))
    with pytest.raises(DataError, match="constant"):
        const.compute()
    with pytest.raises(DataError, match="constant"):
        r2 = ScalarR2()
        r2.update(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 3.0]))
        r2.compute()
    with pytest.raises(DataError, match="latents in chunk 1"):
        L0(4).update(torch.full((2, 4), math.inf))
    with pytest.raises(ShapeError, match="expected 2 rows"):
        FVU(4).update(X, X_HAT[:1])
    with pytest.raises(ShapeError, match="expected FVU of width 4"):
        FVU(4).merge(NMSE(4))
