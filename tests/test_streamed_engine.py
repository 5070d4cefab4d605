"""The engine with SAEs streamed in groups equals the engine with every SAE at once."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from darkmatter.errors import DataError
from darkmatter.experiments.decomposition import Decomposition, decompose
from darkmatter.sae.model import SAE, SAEConfig
from darkmatter.stats.split import Split
from darkmatter.study.budget import BudgetError, group_saes
from synthetic import synthetic_store

SPLIT = Split(0, 0.8)
D = 10
SITES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


def _two_sites(gen: torch.Generator, n: int, t: int) -> dict[str, torch.Tensor]:
    base = torch.randn(n, t, D, generator=gen)
    return {SITES[0]: base, SITES[1]: torch.tanh(base @ torch.randn(D, D, generator=gen)) + 0.1 * base}


def _sae(seed: int, site: str, width: int, k: int) -> SAE:
    g = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=D, d_sae=width, activation="topk", k=k, hook_site=site)
    return SAE.from_tensors(
        cfg,
        {
            "W_enc": torch.randn(D, width, generator=g) / D**0.5,
            "b_enc": 0.1 * torch.randn(width, generator=g),
            "W_dec": torch.randn(width, D, generator=g) / D**0.5,
            "b_dec": 0.1 * torch.randn(D, generator=g),
        },
    )


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("streamed") / "store"
    return synthetic_store(path, _two_sites, n_contexts=48, ctx_len=24, shard_contexts=6, with_loss=True)


@pytest.fixture(scope="module")
def saes() -> dict[str, SAE]:
    specs = [(SITES[0], 16, 2), (SITES[1], 24, 3), (SITES[0], 32, 4), (SITES[0], 8, 2), (SITES[1], 12, 2)]
    return {f"s{i}": _sae(i, site, w, k) for i, (site, w, k) in enumerate(specs)}


def _run(store: Any, saes: dict[str, SAE], table: Path, groups: list[list[str]] | None) -> Decomposition:
    released: list[list[str]] = []
    dec = decompose(
        store,
        saes,
        split=SPLIT,
        batch_tokens=100,
        table_path=table,
        interval_site=SITES[0],
        interval_blocks=4,
        groups=groups,
        release=lambda names: released.append(list(names)),
    )
    assert released == (groups or [list(saes)])
    return dec


def _close(a: Any, b: Any, what: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), what
        for k in a:
            _close(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (u, v) in enumerate(zip(a, b, strict=True)):
            _close(u, v, f"{what}[{i}]")
    elif isinstance(a, (np.ndarray, torch.Tensor)):
        u, v = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        assert u.shape == v.shape, what
        np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-12, err_msg=what)
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-9 * max(1.0, abs(a)), (what, a, b)
    else:
        assert a == b, what


@pytest.mark.parametrize(
    "groups",
    [[["s0"], ["s1"], ["s2"], ["s3"], ["s4"]], [["s0", "s1"], ["s2", "s3", "s4"]]],
    ids=["one", "two"],
)
def test_grouped_equals_all_at_once(store, saes, tmp_path: Path, groups: list[list[str]]) -> None:
    whole = _run(store, saes, tmp_path / "whole.parquet", None)
    grouped = _run(store, saes, tmp_path / "grouped.parquet", groups)
    assert list(grouped.stats) == list(whole.stats)
    for name in saes:
        _close(grouped.stats[name].to_dict(), whole.stats[name].to_dict(), name)
        _close(list(grouped.probes[name]), list(whole.probes[name]), f"probe {name}")
    assert whole.stats["s0"].intervals, "the interval site's SAEs carry intervals"
    for site in SITES:
        w, g = whole.norm_grams[site], grouped.norm_grams[site]
        assert g.columns == w.columns
        _close([g.train, g.test], [w.train, w.test], f"gram {site}")
        _close([list(b) for b in g.blocks], [list(b) for b in w.blocks], f"gram blocks {site}")
        _close(grouped.contexts[site].__dict__, whole.contexts[site].__dict__, f"contexts {site}")
    assert (grouped.n_train, grouped.n_test) == (whole.n_train, whole.n_test)
    t_whole, t_grouped = pq.read_table(whole.table), pq.read_table(grouped.table)
    assert t_grouped.schema == t_whole.schema
    assert t_grouped.equals(t_whole)
    assert not list(tmp_path.glob(".engine-spill-*")), "the scratch folder is removed"


def test_groups_must_name_each_sae_once(store, saes) -> None:
    with pytest.raises(DataError, match="once"):
        decompose(store, saes, split=SPLIT, groups=[["s0"], ["s0", "s1"]], second_pass=False)


def test_group_saes_fits_capacity() -> None:
    costs = {"a": 4, "b": 3, "c": 3, "d": 5}
    assert group_saes(costs, 7, what="engine") == [["a", "b"], ["c"], ["d"]]
    assert group_saes(costs, 100, what="engine") == [["a", "b", "c", "d"]]
    with pytest.raises(BudgetError, match="'d' needs"):
        group_saes(costs, 4, what="engine")
