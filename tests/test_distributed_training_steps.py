"""The layer sweep (Figs 3, 13) and the error SAEs (Figs 7, 8) with 2 gloo ranks in process against one
process: SAEs trained data-parallel within 1e-5 of one process's (and the same bits on both ranks), every
number computed from sums with the same SAEs within 1e-9, and the same result on every rank.

One spawn of 2 ranks serves both tests (the ranks' imports are most of the cost)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from darkmatter.errors import ConfigError
from darkmatter.experiments.error_saes import evaluate_error_saes, train_error_saes
from darkmatter.experiments.layer_baselines import LayerBaselinesResult, layer_baselines
from darkmatter.experiments.layer_saes import load_or_train
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.sae import SAE, SAEConfig, load_sae, save_sae
from darkmatter.sae.train import TrainConfig
from darkmatter.stats import Split
from darkmatter.store import ActivationStore
from synthetic import sparse_features, synthetic_store

SPLIT = Split(seed=0, fraction=0.8)
SITE = "blocks.0.hook_resid_post"
LAYER_TRAIN = TrainConfig(epochs=1, batch_size=64, aux_k=8, dead_tokens=300, checkpoint_every=3)
LAYER_SETTINGS = {
    "d_sae": 24,
    "k": 3,
    "kind": "topk",
    "train": LAYER_TRAIN.model_dump(),
    "split_seed": SPLIT.seed,
    "train_fraction": SPLIT.fraction,
}
ERROR_TRAIN = TrainConfig(epochs=2, batch_size=128, lr=2e-3, dead_tokens=1000, checkpoint_every=4, aux_k=8)
Probe = tuple[torch.Tensor, torch.Tensor]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / a.double().norm().clamp_min(1e-30))


def _close(one: Any, two: Any, rtol: float, path: str = "") -> float:
    """The largest relative difference of the floats in two equal-shaped structures (asserted ≤ ``rtol``);
    everything else must be equal."""
    if isinstance(one, dict):
        assert set(one) == set(two), path
        return max([_close(one[k], two[k], rtol, f"{path}.{k}") for k in one], default=0.0)
    if isinstance(one, list):
        assert len(one) == len(two), path
        pairs = enumerate(zip(one, two, strict=True))
        return max([_close(a, b, rtol, f"{path}[{i}]") for i, (a, b) in pairs], default=0.0)
    if isinstance(one, float):
        diff = abs(one - two) / max(abs(one), 1e-30)
        assert diff <= rtol, (path, one, two, diff)
        return diff
    assert one == two, (path, one, two)
    return 0.0


def _tensors(saes: dict[Any, SAE]) -> dict[Any, dict[str, torch.Tensor]]:
    return {key: {k: v.detach().clone() for k, v in s.named_tensors()} for key, s in saes.items()}


# ---------------------------------------------------------------- inputs


def _layer_store(path: Path) -> ActivationStore:
    """Two layers with per-token loss in 5 shards of 8 contexts: with 3 jackknife blocks, block 1 is shards
    2 and 3, which fall to different ranks."""
    features = sparse_features(d=8, n_features=16, active=2)

    def make(gen: torch.Generator, n_ctx: int, ctx_len: int) -> dict[str, torch.Tensor]:
        x = features(gen, n_ctx, ctx_len)[SITE]
        noise = 0.1 * torch.randn(x.shape, generator=gen)
        return {SITE: x, "blocks.1.hook_resid_post": 1.5 * x.roll(1, -1) + noise}

    return synthetic_store(path, make, n_contexts=40, ctx_len=16, shard_contexts=8, with_loss=True)


def _error_inputs(root: Path) -> tuple[ActivationStore, SAE, Probe]:
    """A store, a random narrow SAE on it and the least-squares probe of its error."""
    store = synthetic_store(root / "store", sparse_features(d=12, n_features=24, active=2), n_contexts=32)
    g = torch.Generator().manual_seed(1)
    tensors = {
        "W_enc": torch.randn(12, 8, generator=g),
        "b_enc": torch.zeros(8),
        "W_dec": 0.5 * torch.randn(8, 12, generator=g),
        "b_dec": torch.randn(12, generator=g),
    }
    sae = SAE.from_tensors(SAEConfig(d_in=12, d_sae=8, activation="topk", k=2, hook_site=SITE), tensors)
    rows = list(store.iter_batches([SITE], batch_tokens=10**6))
    x = torch.cat([b.acts[SITE] for b in rows])
    train = torch.cat([SPLIT.mask(b.context, b.position) for b in rows])
    with torch.no_grad():
        e = x - sae(x)
    xt = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    sol = torch.linalg.lstsq(xt[train], e[train].double()).solution.float()
    return store, sae, (sol[:-1].contiguous(), sol[-1].contiguous())


# ---------------------------------------------------------------- the same work, by one process or a rank


def _layer_saes(store: ActivationStore, root: Path, ranks: Ranks) -> tuple[dict[int, SAE], list[int]]:
    return load_or_train(
        store, [0, 1], root, LAYER_SETTINGS, LAYER_TRAIN, SPLIT, lambda _m: None, ranks=ranks
    )


def _baselines(store: ActivationStore, saes: dict[int, SAE], ranks: Ranks) -> dict[str, Any]:
    res: LayerBaselinesResult = layer_baselines(
        store, saes, split=SPLIT, batch_tokens=50, interval_blocks=3, ranks=ranks
    )
    keep = ("r2", "fvu", "l0", "intervals", "n_train_tokens", "n_test_tokens", "interval_blocks", "notes")
    return {k: v for k, v in res.model_dump().items() if k in keep}


def _error_setup(tmp: Path) -> tuple[ActivationStore, SAE, Probe]:
    """The store, SAE and probe `_error_inputs` made, as saved (one process and the ranks read the same)."""
    probe = torch.load(tmp / "probe.pt")
    return ActivationStore.open(tmp / "errors" / "store"), load_sae(tmp / "base"), probe


def _train_errors(tmp: Path, workdir: str, ranks: Ranks) -> tuple[dict[str, Any], dict[str, SAE]]:
    store, sae, probe = _error_setup(tmp)
    res, saes = train_error_saes(
        store, sae, probe, d_sae=32, k=3, train=ERROR_TRAIN, workdir=tmp / workdir, split=SPLIT, ranks=ranks
    )
    return res.model_dump(), saes


def _quality(tmp: Path, saes: dict[str, SAE], ranks: Ranks) -> dict[str, Any]:
    store, sae, probe = _error_setup(tmp)
    return evaluate_error_saes(store, sae, probe, saes, split=SPLIT, ranks=ranks)


def _rank_main(rank: int, tmp: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'rendezvous'}", rank=rank, world_size=2)
    ranks = Ranks(rank=rank, world=2, backend="gloo")
    store = ActivationStore.open(tmp / "layers")
    fresh, fresh_reused = _layer_saes(store, tmp / "two", ranks)  # trained on 2 ranks
    again, reused = _layer_saes(store, tmp / "reuse", ranks)  # one process's, as rank 0 decides
    refused = ""
    try:
        load_or_train(
            store, [0, 1], tmp / "reuse", {**LAYER_SETTINGS, "k": 2}, LAYER_TRAIN, SPLIT, print, ranks=ranks
        )
    except ConfigError as exc:
        refused = str(exc)
    baselines = _baselines(store, again, ranks)
    errors, error_saes = _train_errors(tmp, "errors-two", ranks)
    fixed = {c: load_sae(tmp / "error-saes" / c) for c in ("linear", "nonlinear")}
    quality = _quality(tmp, fixed, ranks)
    dist.barrier()  # no rank leaves while another still talks to it (gloo can abort at exit otherwise)
    dist.destroy_process_group()
    out = {
        "layer_saes": _tensors(fresh),
        "reused": (fresh_reused, reused),
        "refused": refused,
        "baselines": baselines,
        "errors": errors,
        "error_saes": _tensors(error_saes),
        "quality": quality,
    }
    torch.save(out, tmp / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One process's SAEs and numbers, then the same work on 2 ranks (each rank's output, in rank order)."""
    import torch.multiprocessing as mp

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("dist-steps")
    store = _layer_store(tmp / "layers")
    one: dict[str, Any] = {"layer_saes": _tensors(_layer_saes(store, tmp / "one", SINGLE)[0])}
    shutil.copytree(tmp / "one", tmp / "reuse")
    one["baselines"] = _baselines(store, _layer_saes(store, tmp / "one", SINGLE)[0], SINGLE)  # as saved
    _, sae, probe = _error_inputs(tmp / "errors")
    save_sae(sae, tmp / "base")
    torch.save(probe, tmp / "probe.pt")
    one["errors"], error_saes = _train_errors(tmp, "errors-one", SINGLE)
    one["error_saes"] = _tensors(error_saes)
    saved = {c: load_sae(save_sae(s, tmp / "error-saes" / c)) for c, s in error_saes.items()}
    one["quality"] = _quality(tmp, saved, SINGLE)
    mp.spawn(_rank_main, args=(tmp,), nprocs=2, join=True)
    return {
        "tmp": tmp,
        "one": one,
        "ranks": [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)],
    }


def _same_bits_on_both_ranks(ranks: list[dict[str, Any]], key: str) -> None:
    for name, tensors in ranks[0][key].items():
        assert all(torch.equal(t, ranks[1][key][name][k]) for k, t in tensors.items()), name


def _worst(one: dict[Any, dict[str, torch.Tensor]], two: dict[Any, dict[str, torch.Tensor]]) -> float:
    """The largest relative Frobenius difference of the SAEs' tensors (asserted ≤ 1e-5)."""
    assert one.keys() == two.keys()
    diffs = [_rel(t, two[name][k]) for name, tensors in one.items() for k, t in tensors.items()]
    assert max(diffs) <= 1e-5
    return max(diffs)


def test_layer_sweep_on_two_ranks_equals_one_process(runs: dict[str, Any]) -> None:
    one, ranks, tmp = runs["one"], runs["ranks"], runs["tmp"]
    two = ranks[0]
    print(f"layer SAEs: {_worst(one['layer_saes'], two['layer_saes']):.1e}")
    _same_bits_on_both_ranks(ranks, "layer_saes")  # the ranks trained in lockstep
    saved = [{layer: load_sae(tmp / d / str(layer)) for layer in (0, 1)} for d in ("one", "two")]
    _worst(*(_tensors(s) for s in saved))  # what rank 0 saved
    assert sorted(p.name for p in (tmp / "two").iterdir()) == ["0", "1"]  # no training leftovers
    assert two["reused"] == ([], [0, 1]) and "other settings" in two["refused"]
    # the same SAEs: every number from the sums within 1e-9 (block 1 was summed across the ranks)
    numbers = two["baselines"]
    assert numbers["interval_blocks"] == 3 and set(numbers["intervals"]) == set(numbers["r2"])
    print(f"layer baselines: {_close(one['baselines'], two['baselines'], 1e-9):.1e}")
    assert ranks[1]["baselines"] == two["baselines"] and ranks[1]["refused"] == two["refused"]


def test_error_saes_on_two_ranks_equal_one_process(runs: dict[str, Any]) -> None:
    one, ranks = runs["one"], runs["ranks"]
    two = ranks[0]
    print(f"error SAEs: {_worst(one['error_saes'], two['error_saes']):.1e}")
    _same_bits_on_both_ranks(ranks, "error_saes")
    # the same SAEs: the held-out quality within 1e-9 (each rank's shards, summed)
    print(f"error SAE quality, same SAEs: {_close(one['quality'], two['quality'], 1e-9):.1e}")
    # what does not depend on the trained SAEs: the components' variance and the test tokens
    mine, theirs = one["errors"], two["errors"]
    print(f"variance ratios: {_close(mine['variance_ratio'], theirs['variance_ratio'], 1e-9):.1e}")
    assert mine["n_test"] == theirs["n_test"]
    # the quality of the SAEs trained on 2 ranks follows from SAEs 1e-5 apart; so do the training curves
    print(f"error SAE quality, trained on 2 ranks: {_close(mine['saes'], theirs['saes'], 1e-4):.1e}")
    print(f"training curves: {_close(mine['curves'], theirs['curves'], 1e-3):.1e}")
    assert ranks[1]["errors"] == two["errors"] and ranks[1]["quality"] == two["quality"]
