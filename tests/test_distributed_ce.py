"""The downstream CE splices dealt across ranks in whole batches give the one-process result: partial
outputs merged (in one process, ranks simulated) and 2 gloo ranks (``downstream_ce`` and the joint-map CE)."""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from darkmatter.experiments.downstream import downstream_ce
from darkmatter.experiments.joint_ce import downstream_ce_with_joint
from darkmatter.experiments.joint_map import SELF, JointMap
from darkmatter.experiments.splice import EngineOutput, UnitTally, merge_outputs, rank_batches
from darkmatter.lm.hooks import capture, run
from darkmatter.ranks import SINGLE, Ranks
from darkmatter.results import Result
from darkmatter.sae.model import SAE
from test_downstream import topk_sae  # the same seeded SAEs as the one-process CE tests

from conftest import tiny_model

D = 64
SITE = "blocks.1.hook_resid_post"
REGRESSORS = {"prev": "blocks.0.hook_resid_post", "attn": "blocks.1.hook_attn_out"}
START, BATCH = 6, 2
N_CONTEXTS = 7  # 4 batches, the last one of a single context
BOTH_BATCHES = 3  # the sae+both check spans the shares of 2 ranks
VOLATILE = {"seconds", "provenance"}


def small_probe(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(D, D, generator=g) * 0.05, torch.randn(D, generator=g) * 0.01


def joint_map(target: SAE, regs: dict[str, SAE]) -> JointMap:
    blocks = [(n, str(s.cfg.hook_site), D) for n, s in regs.items()] + [(SELF, SITE, D)]
    g = torch.Generator().manual_seed(5)
    return JointMap(SITE, blocks, torch.randn(D * len(blocks), D, generator=g) * 0.05, torch.zeros(D))


def contexts(n: int = N_CONTEXTS, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, 60, size=(n, 24)).astype(np.int32)


def run_downstream(model: torch.nn.Module, ranks: Ranks) -> Result:
    """``downstream_ce`` of 2 SAEs with mean ablation and the exactness check on the first 3 batches."""
    saes = {"a": topk_sae(0), "b": topk_sae(1, width=64)}
    probes = {"a": small_probe(10), "b": small_probe(11)}
    with torch.no_grad(), capture(model, [SITE]) as cap:
        run(model, input_ids=torch.as_tensor(contexts(4, seed=7).astype(np.int64)))
    mean = cap.acts[SITE].reshape(-1, D).mean(0)
    return downstream_ce(
        model,
        contexts(),
        saes,
        probes,
        start=START,
        batch_size=BATCH,
        mean_acts={SITE: mean},
        both_batches=BOTH_BATCHES,
        ranks=ranks,
    )


def run_joint(model: torch.nn.Module, ranks: Ranks) -> Result:
    """The joint-map CE of SAE "a" with regressors at 2 earlier sites."""
    target = topk_sae(0)
    regs = {n: topk_sae(20 + i, site) for i, (n, site) in enumerate(REGRESSORS.items())}
    jm = joint_map(target, regs)
    kw: dict[str, Any] = {"start": START, "batch_size": BATCH, "probe": small_probe(10), "ranks": ranks}
    return downstream_ce_with_joint(model, contexts(), target, regs, jm, **kw)


EXPERIMENTS = {"downstream": run_downstream, "joint": run_joint}


def numbers(x: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a dumped result by its path (volatile fields left out)."""
    if isinstance(x, dict):
        return {
            k: v
            for key, i in x.items()
            if key not in VOLATILE
            for k, v in numbers(i, f"{path}/{key}").items()
        }
    if isinstance(x, list):
        return {k: v for n, i in enumerate(x) for k, v in numbers(i, f"{path}[{n}]").items()}
    return {path: x}


def worst_difference(one: Result, many: Result) -> float:
    """The largest relative difference of any number of the two results (the rest must be equal)."""
    a, b = numbers(one.model_dump()), numbers(many.model_dump())
    assert a.keys() == b.keys()
    worst = 0.0
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, float) and isinstance(vb, float):
            rel = abs(va - vb) / max(abs(va), abs(vb), 1e-300)
            assert rel <= 1e-9, (key, va, vb)
            worst = max(worst, rel)
        else:
            assert va == vb, (key, va, vb)
    return worst


def check_downstream(res: Any) -> None:
    """The result exercises what dealing batches could break: a check on batches of several ranks, the
    intervals, every setting."""
    row = res.saes["a"]
    assert row.both_scored_tokens == BOTH_BATCHES * BATCH * (24 - START - 1) < res.scored_tokens
    assert row.intervals and set(row.ce) >= {"clean", "sae", "sae+linear", "sae+nonlinear", "zero", "mean"}


# -- one process: the ranks simulated, their parts merged ----------------------------------------------------


class _SentError(Exception):
    def __init__(self, part: Any) -> None:
        self.part = part


@dataclass(eq=False)
class _Simulated(Ranks):
    """Rank ``rank`` of ``world`` in this process: ``gather`` sends its part through pickle; a rank > 0
    stops there, handing its part out; rank 0 receives the others' parts."""

    others: list[Any] = field(default_factory=list)

    def gather(self, obj: Any) -> list[Any]:
        obj = pickle.loads(pickle.dumps(obj))
        if self.rank:
            raise _SentError(obj)
        return [obj, *self.others]


def simulate(world: int, fn: Any) -> Any:
    """``fn(ranks)`` as rank 0 of ``world`` returns it, the other ranks' parts computed first."""
    parts = []
    for rank in range(1, world):
        with pytest.raises(_SentError) as sent:
            fn(_Simulated(rank=rank, world=world))
        parts.append(sent.value.part)
    return fn(_Simulated(rank=0, world=world, others=parts))


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def one_process(model: torch.nn.Module) -> dict[str, Result]:
    return {name: fn(model, SINGLE) for name, fn in EXPERIMENTS.items()}


# 5 ranks for 4 batches: one batch each (the check's 3 batches on 3 ranks), the last rank has none
@pytest.mark.parametrize(("name", "world"), [("downstream", 5), ("joint", 2)])
def test_parts_merged_in_rank_order_give_the_one_process_result(
    model, one_process, name: str, world: int
) -> None:
    t0 = time.perf_counter()
    many = simulate(world, lambda ranks: EXPERIMENTS[name](model, ranks))
    worst = worst_difference(one_process[name], many)
    if name == "downstream":
        check_downstream(many)
    seconds = time.perf_counter() - t0
    print(f"{name}, {world} simulated ranks: worst relative difference {worst:.1e} ({seconds:.1f} s)")


def test_rank_batches_deal_whole_batches_and_merge_outputs_adds_them() -> None:
    for n, world in ((7, 2), (7, 5), (8, 3), (1, 4)):
        shares = [rank_batches(n, BATCH, Ranks(rank=r, world=world)) for r in range(world)]
        assert [b for s in shares for b in s] == list(range(-(-n // BATCH)))

    def part(ce: float, diff: float, contexts: list[float], n: int) -> EngineOutput:
        tally = UnitTally(
            {"s": ce}, {"s": 2 * ce}, {"s": ce / 2}, {"s": n}, {"s": diff}, {"s": contexts}, 1.0
        )
        return EngineOutput(sum(contexts), n, {"u": tally}, 3, list(contexts))

    a, b, empty = part(1.0, 0.5, [0.25, 0.75], 4), part(2.0, 0.25, [2.0], 2), EngineOutput(0.0, 0, {}, 0)
    merged = merge_outputs([a, b, empty])
    t = merged.tallies["u"]
    assert (t.ce, t.kl, t.clean, t.n, t.max_abs_ce_diff) == (
        {"s": 3.0},
        {"s": 6.0},
        {"s": 1.5},
        {"s": 6},
        {"s": 0.5},
    )
    assert t.per_context == {"s": [0.25, 0.75, 2.0]} and merged.clean_per_context == [0.25, 0.75, 2.0]
    assert (merged.clean_ce_sum, merged.n_scored, merged.forward_passes) == (3.0, 6, 6)
    assert a.tallies["u"].per_context == {"s": [0.25, 0.75]}  # the parts are left as they were


def test_bad_batches_are_clear_errors() -> None:
    from darkmatter.errors import ConfigError
    from darkmatter.experiments.splice import run_splices

    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        rank_batches(7, 0, SINGLE)
    model, tokens = tiny_model("llama"), np.zeros((5, 16), dtype=np.int64)
    for bad in (range(2, 4), range(-1, 1), range(0, 3, 2)):  # 3 batches of 2: indices 0..2
        with pytest.raises(ConfigError, match="batches must be consecutive indices below 3"):
            run_splices(model, tokens, [], start=START, batch_size=2, batches=bad)


# -- 2 gloo ranks --------------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, init: str, out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = tiny_model("llama")
        ranks = Ranks(rank=rank, world=world, backend="gloo")
        dumps = {name: fn(model, ranks).model_dump() for name, fn in EXPERIMENTS.items()}
    finally:
        dist.barrier()  # no rank leaves while another still talks to it (gloo can abort at exit otherwise)
        dist.destroy_process_group()
    (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(dumps))


def test_two_gloo_ranks_give_the_one_process_result(one_process, tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    t0 = time.perf_counter()
    mp.spawn(_rank_main, args=(2, f"file://{tmp_path / 'rendezvous'}", tmp_path), nprocs=2, join=True)
    seconds = time.perf_counter() - t0
    worst = 0.0
    for rank in range(2):
        dumps = pickle.loads((tmp_path / f"rank{rank}.pkl").read_bytes())
        for name, one in one_process.items():
            many = type(one).model_validate(dumps[name])
            worst = max(worst, worst_difference(one, many))  # every rank returns the one-process result
            if name == "downstream":
                check_downstream(many)
    print(f"2 gloo ranks: worst relative difference {worst:.1e} ({seconds:.1f} s with the spawn)")
