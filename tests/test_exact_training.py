"""Data-parallel SAE training is exact: 2 and 3 gloo ranks (in process) train the SAEs of one process, TopK,
BatchTopK and JumpReLU alike, with dead latents and the AuxK loss, over enough Adam steps that float32
gradient sums in another order would drift far apart."""

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


def _train(store_path: Path, workdir: Path, rank: int, world: int, init: str) -> dict[str, Any]:
    """One TopK, one BatchTopK and one JumpReLU SAE (dead latents early: AuxK runs), 64 steps, as ``rank``
    of ``world``; single-threaded so that every process runs the same float32 kernels."""
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
    cfg = TrainConfig(**TRAIN)
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
        dist.destroy_process_group()
    torch.set_num_threads(threads)
    return result


def _rank_main(rank: int, store_path: Path, root: Path) -> None:
    """Train as a rank of 3 (8 row blocks dealt 3 + 3 + 2), then, ranks 0 and 1, of 2 (4 + 4)."""
    for world in (3, 2):
        if rank < world:
            init = f"file://{root / f'rendezvous-{world}'}"
            result = _train(store_path, root / f"work-{world}-{rank}", rank, world, init)
            torch.save(result, root / f"ranks-{world}-{rank}.pt")


def _relative_differences(one: dict[str, Any], many: dict[str, Any]) -> dict[str, float]:
    out = {}
    for i, (a, b) in enumerate(zip(one["tensors"], many["tensors"], strict=True)):
        for key, ta in a.items():
            diff = (ta.double() - b[key].double()).norm() / ta.double().norm().clamp_min(1e-30)
            out[f"{i}.{key}"] = float(diff)
    return out


def test_two_and_three_ranks_train_the_saes_of_one_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from synthetic import sparse_features, synthetic_store

    store = tmp_path / "store"
    synthetic_store(store, sparse_features(d=12, n_features=24, active=2), n_contexts=32, ctx_len=32)
    one = _train(store, tmp_path / "one", 0, 1, "")
    assert one["steps"] >= 60 and min(one["dead"]) > 0  # long enough to drift; AuxK exercised by each kind
    mp.spawn(_rank_main, args=(store, tmp_path), nprocs=3, join=True)
    for world in (2, 3):
        for rank in range(world):
            many = torch.load(tmp_path / f"ranks-{world}-{rank}.pt", weights_only=True)
            assert many["dead"] == one["dead"]
            assert many["history"] == one["history"]  # every logged statistic, bit for bit
            diffs = _relative_differences(one, many)
            worst = max(diffs, key=diffs.__getitem__)
            assert diffs[worst] <= TOLERANCE, (world, rank, worst, diffs[worst])
