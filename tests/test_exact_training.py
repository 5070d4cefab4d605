"""Data-parallel SAE training is exact: 2 and 3 gloo ranks (in process) train the SAEs of one process, TopK,
BatchTopK and JumpReLU alike, with dead latents and the AuxK loss, over enough Adam steps that float32
gradient sums in another order drift apart (by ~1e-6 here, ~1e-2 in a study)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from darkmatter.ranks import Ranks
from darkmatter.store import ActivationStore

SITE = "blocks.0.hook_resid_post"
KINDS = ("topk", "batchtopk", "jumprelu")
WIDTH = 64
TRAIN: dict[str, Any] = dict(
    epochs=5, batch_size=64, lr=8e-3, dead_tokens=200, aux_k=8, checkpoint_every=1000, validation_tokens=0
)
TOLERANCE = 1e-7  # relative Frobenius norm per tensor (measured: 0, bit for bit; summed in float32 ~1e-6)


def _train(
    store_path: Path, workdir: Path, rank: int, world: int, init: str, blocks: int = 8
) -> dict[str, Any]:
    """One TopK, one BatchTopK and one JumpReLU SAE (dead latents early: AuxK runs), 65 steps of batches
    cut into ``blocks`` row blocks, as ``rank`` of ``world``; single-threaded so that every process runs the
    same float32 kernels."""
    import torch.distributed as dist

    from darkmatter.sae.train import FamilyTrainer, SAESpec, TrainConfig
    from darkmatter.stats import Split

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ranks = Ranks()
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        ranks = Ranks(rank=rank, world=world, backend="gloo")
    specs = [SAESpec(name=kind, site=SITE, d_sae=WIDTH, k=2, kind=kind) for kind in KINDS]
    cfg = TrainConfig(**TRAIN, grad_blocks=blocks)
    store = ActivationStore.open(store_path)
    trainer = FamilyTrainer(store, specs, cfg, workdir, split=Split(seed=0, fraction=0.8), ranks=ranks)
    saes = trainer.train()
    result = {
        "steps": trainer.step,
        "tensors": [{k: v.clone() for k, v in s.state_dict().items()} for s in saes],
        "dead": [max(h["dead_fraction"] for h in m.history) for m in trainer.members],
        "history": [m.history for m in trainer.members],
    }
    if world > 1:
        dist.barrier()  # no collective in flight when the group goes (gloo can abort at exit otherwise)
        dist.destroy_process_group()
    torch.set_num_threads(threads)
    return result


RUNS = ((3, 2), (2, 8))  # (ranks, row blocks): blocks dealt 1 + 1 + 0 (uneven, one rank idle), then 4 + 4


def _rank_main(rank: int, store_path: Path, root: Path) -> None:
    for world, blocks in RUNS:
        if rank < world:
            init = f"file://{root / f'rendezvous-{world}-{blocks}'}"
            result = _train(store_path, root / f"work-{world}-{blocks}-{rank}", rank, world, init, blocks)
            torch.save(result, root / f"ranks-{world}-{blocks}-{rank}.pt")


def _relative_differences(one: dict[str, Any], many: dict[str, Any]) -> dict[str, float]:
    out = {}
    for i, (a, b) in enumerate(zip(one["tensors"], many["tensors"], strict=True)):
        for key, ta in a.items():
            diff = (ta.double() - b[key].double()).norm() / ta.double().norm().clamp_min(1e-30)
            out[f"{i}.{key}"] = float(diff)
    return out


def test_row_blocks_cover_the_batch_in_order_whatever_its_size() -> None:
    from darkmatter.sae.data_parallel import row_blocks

    assert row_blocks(64, 8) == [(i, i + 8) for i in range(0, 64, 8)]
    assert row_blocks(10, 4) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert row_blocks(3, 8) == [(0, 1), (1, 2), (2, 3)]


def test_two_and_three_ranks_train_the_saes_of_one_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from synthetic import sparse_features, synthetic_store

    store = tmp_path / "store"
    synthetic_store(store, sparse_features(d=12, n_features=24, active=2), n_contexts=32, ctx_len=32)
    one = {b: _train(store, tmp_path / f"one-{b}", 0, 1, "", b) for b in sorted({b for _, b in RUNS})}
    assert one[8]["steps"] >= 60 and min(one[8]["dead"]) > 0  # long enough to drift; AuxK in each kind
    mp.spawn(_rank_main, args=(store, tmp_path), nprocs=max(w for w, _ in RUNS), join=True)
    for world, blocks in RUNS:
        for rank in range(world):
            many = torch.load(tmp_path / f"ranks-{world}-{blocks}-{rank}.pt", weights_only=True)
            assert many["dead"] == one[blocks]["dead"]
            assert many["history"] == one[blocks]["history"]  # every logged statistic, bit for bit
            diffs = _relative_differences(one[blocks], many)
            worst = max(diffs, key=diffs.__getitem__)
            assert diffs[worst] <= TOLERANCE, (world, blocks, rank, worst, diffs[worst])
