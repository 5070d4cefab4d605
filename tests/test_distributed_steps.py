"""Data parallelism of the pursuit and earlier-layer steps: 2 gloo ranks on the CPU against one process on
a small synthetic store (the pursuit step, ``fvu_with_probes``, ``earlier_layer_predictors`` with blocks
inside one rank's shards and blocks across two ranks, and the data-parallel MLP probe).

The ranks are spawned once per module; rank 0 then computes the one-process results in the same process
(one thread, as the ranks), so every difference comes from the dealing and the sums."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from darkmatter.ranks import SINGLE, Ranks
from synthetic import synthetic_store
from test_earlier_layers import ATTN, MLP, PREV, RESID, SPLIT, all_rows, components, lstsq, relu_sae, topk_sae

K = 4
N_CONTEXTS, CTX_LEN, SHARD_CONTEXTS = 40, 16, 8  # 5 shards: rank 0 holds 3, rank 1 holds 2
ALIGNED, ACROSS = 5, 3  # interval blocks: one per shard; 3 blocks, the middle one across both ranks
MLP_KW: dict[str, Any] = {"hidden": 16, "epochs": 3, "lr": 1e-2, "minibatch": 50, "split": SPLIT}


def _saes() -> dict[str, Any]:
    return {f"L0.resid.w{w}.k{K}": topk_sae(PREV, seed=w, width=w, k=K) for w in (32, 64)}


def _regression_inputs(store_path: Path) -> tuple[Any, ...]:
    from darkmatter.store import ActivationStore

    store = ActivationStore.open(store_path)
    target = topk_sae(RESID, 0)
    regs = {"prev residual": topk_sae(PREV, 1), "attention": topk_sae(ATTN, 2), "MLP": topk_sae(MLP, 3)}
    rows, train = all_rows(store, [RESID])
    x = rows[RESID]
    sol = lstsq(x[train], (x - target(x.float()).double())[train])
    relu_sol = lstsq(x[train], (x - torch.relu(x))[train])
    return (
        store,
        target,
        regs,
        (sol[:-1].float(), sol[-1].float()),
        (relu_sol[:-1].float(), relu_sol[-1].float()),
    )


def _compute(root: Path, ranks: Ranks) -> dict[str, Any]:
    """Every function under test, as ``ranks`` (SINGLE: one process)."""
    import darkmatter.experiments.mlp_probe as mlp_module
    from darkmatter.config import resolve_config
    from darkmatter.experiments.earlier_layers import earlier_layer_predictors, mlp_probe
    from darkmatter.experiments.fixed_probes import fvu_with_probes
    from darkmatter.study.context import StudyContext
    from darkmatter.study.steps.pursuit import PURSUIT, spread_contexts

    store, target, regs, probe, relu_probe = _regression_inputs(root / "store")
    out: dict[str, Any] = {}
    cfg = resolve_config("tiny", overrides=["layer=0", f"family.k={K}", "pursuit.n_contexts=6"])
    ctx = StudyContext(cfg, root / "study", log=lambda _m: None, ranks=ranks)
    saes = _saes()
    ctx.use_store(store)
    ctx.use_family(saes)
    out["pursuit"] = PURSUIT.run(ctx).model_dump()
    probes = {n: ctx.probe(n) for n in saes}
    for label, contexts in (("fixed", spread_contexts(6, store.n_contexts)), ("fixed_all", None)):
        fits, n_test = fvu_with_probes(store, saes, probes, split=ctx.split, contexts=contexts, ranks=ranks)
        out[label] = {"n_test": n_test, **{n: vars(f) for n, f in fits.items()}}
    for label, blocks in (("aligned", ALIGNED), ("across", ACROSS)):
        res = earlier_layer_predictors(
            store, target, probe, regs, split=SPLIT, interval_blocks=blocks, ranks=ranks
        )
        assert res.joint_map is not None
        out[label] = res.model_dump(exclude={"seconds"}) | {"joint_weights": res.joint_map.weights.clone()}
    nets: list[dict[str, torch.Tensor]] = []
    evaluate = mlp_module._evaluate

    def keep_net(net: torch.nn.Module, *args: Any) -> Any:
        nets.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return evaluate(net, *args)  # type: ignore[arg-type]

    mlp_module._evaluate = keep_net  # type: ignore[assignment]
    try:
        out["mlp"] = mlp_probe(store, relu_sae(12, RESID), relu_probe, **MLP_KW, ranks=ranks)
    finally:
        mlp_module._evaluate = evaluate
    out["mlp"].pop("seconds")
    out["mlp_net"] = nets[0]
    return out


def _rank_main(rank: int, root: Path, init: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    result = _compute(root, Ranks(rank=rank, world=2, backend="gloo"))
    dist.barrier()  # no rank leaves while another still talks to it (gloo can abort at exit otherwise)
    dist.destroy_process_group()
    torch.save(result, root / f"rank{rank}.pt")
    if rank == 0:
        torch.save(_compute(root, SINGLE), root / "one.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(one process, rank 0, rank 1)."""
    import torch.multiprocessing as mp

    from darkmatter.config import resolve_config
    from darkmatter.experiments.decomposition import decompose
    from darkmatter.study.context import StudyContext
    from darkmatter.study.probes import save_probe

    root = tmp_path_factory.mktemp("dist-steps")
    store = synthetic_store(
        root / "store", components(), n_contexts=N_CONTEXTS, ctx_len=CTX_LEN, shard_contexts=SHARD_CONTEXTS
    )
    assert store.n_shards == 5
    cfg = resolve_config("tiny", overrides=["layer=0", f"family.k={K}"])
    ctx = StudyContext(cfg, root / "study", log=lambda _m: None)
    for name, (weights, bias) in decompose(store, _saes(), split=ctx.split, second_pass=False).probes.items():
        save_probe(ctx.paths.probe(name), weights, bias)  # the engine's probes, read by the pursuit step
    mp.spawn(_rank_main, args=(root, f"file://{root / 'rendezvous'}"), nprocs=2, join=True)
    return tuple(torch.load(root / f"{name}.pt", weights_only=False) for name in ("one", "rank0", "rank1"))


def _numbers(x: Any, path: str = "") -> dict[str, float]:
    """Every number of a nested result, by its path."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() for k, v in _numbers(val, f"{path}.{key}").items()}
    if isinstance(x, (list, tuple)):
        return {k: v for i, val in enumerate(x) for k, v in _numbers(val, f"{path}[{i}]").items()}
    if isinstance(x, torch.Tensor):
        return {f"{path}[{i}]": float(v) for i, v in enumerate(x.double().reshape(-1))}
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return {path: float(x)}
    return {}


def _max_rel(a: Any, b: Any) -> float:
    """The largest relative difference of the numbers of ``a`` and ``b`` (which hold the same ones)."""
    na, nb = _numbers(a), _numbers(b)
    assert na.keys() == nb.keys() and na
    worst = 0.0
    for key, va in na.items():
        vb = nb[key]
        if not (np.isfinite(va) and np.isfinite(vb)):
            assert va == vb or (np.isnan(va) and np.isnan(vb)), key
            continue
        worst = max(worst, abs(va - vb) / max(abs(va), 1e-12))
    return worst


def test_pursuit_step_on_two_ranks_gives_one_process(runs) -> None:
    from darkmatter.study.steps.earlier_layers import EARLIER_LAYERS
    from darkmatter.study.steps.pursuit import PURSUIT

    assert PURSUIT.distributed and EARLIER_LAYERS.distributed  # the runner runs them on every rank
    one, r0, r1 = runs
    assert len(one["pursuit"]["saes"]) == 2 and one["pursuit"]["saes"][0]["intervals"]
    assert r1["pursuit"]["saes"] == []  # a placeholder: the runner records rank 0's result
    assert _max_rel(one["pursuit"], r0["pursuit"]) <= 1e-9


@pytest.mark.parametrize("label", ["fixed", "fixed_all"])
def test_fixed_probes_on_two_ranks_give_one_process(runs, label: str) -> None:
    one, r0, r1 = runs
    assert r0[label] == r1[label]
    assert one[label]["n_test"] == r0[label]["n_test"]
    assert _max_rel(one[label], r0[label]) <= 1e-9


def test_regressions_with_blocks_inside_ranks_are_exact(runs) -> None:
    one, r0, r1 = runs
    assert one["aligned"]["interval_blocks"] == ALIGNED and one["aligned"]["intervals"]
    assert _max_rel(r0["aligned"], r1["aligned"]) == 0.0  # every rank fits the same (joint map included)
    assert _max_rel(one["aligned"], r0["aligned"]) == 0.0


def test_regressions_with_a_block_across_ranks_give_one_process(runs) -> None:
    one, r0, r1 = runs
    assert one["across"]["interval_blocks"] == ACROSS and one["across"]["intervals"]
    assert _max_rel(r0["across"], r1["across"]) == 0.0
    assert _max_rel(one["across"], r0["across"]) <= 1e-9


def test_data_parallel_mlp_probe_trains_the_mlp_of_one_process(runs) -> None:
    one, r0, r1 = runs
    assert _max_rel(r0["mlp"], r1["mlp"]) == 0.0 and _max_rel(r0["mlp_net"], r1["mlp_net"]) == 0.0
    assert one["mlp"]["n_train"] == r0["mlp"]["n_train"] and one["mlp"]["n_test"] == r0["mlp"]["n_test"]
    for key, ta in one["mlp_net"].items():
        tb = r0["mlp_net"][key]
        diff = float((ta.double() - tb.double()).norm() / ta.double().norm().clamp_min(1e-30))
        assert diff <= 1e-5, (key, diff)
    assert _max_rel(one["mlp"], r0["mlp"]) <= 1e-5
