"""``torchrun`` data parallelism: 2 gloo ranks on the CPU give the store and the results of one process, and
a killed rank stops every rank and resumes to the same results."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from darkmatter.ranks import Ranks
from darkmatter.store import MANIFEST, ActivationStore


def test_shares_are_contiguous_balanced_and_cover_everything() -> None:
    for n in (0, 1, 5, 8, 33):
        for world in (1, 2, 3, 5):
            parts = [Ranks(rank=r, world=world).share(list(range(n))) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_one_process_is_rank_0_of_1_and_bad_settings_are_clear_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from darkmatter.errors import ConfigError
    from darkmatter.ranks import SINGLE, collective_timeout_s, from_environment

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert from_environment("cpu") is SINGLE and not SINGLE.active and SINGLE.leader
    monkeypatch.setenv("DARKMATTER_DIST_TIMEOUT_S", "ten minutes")
    with pytest.raises(ConfigError, match="DARKMATTER_DIST_TIMEOUT_S"):
        collective_timeout_s()
    monkeypatch.setenv("DARKMATTER_DIST_TIMEOUT_S", "600")
    assert collective_timeout_s() == 600.0
    if not torch.cuda.is_available():
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            from_environment("cuda")


def _shard(index: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(index)
    return {"s": torch.randn(2, 3, 4, generator=g)}


def _store(root: Path) -> ActivationStore:
    tokens = np.arange(7 * 3, dtype=np.int32).reshape(7, 3)
    identity = {"sites": ["s"], "d": {"s": 4}, "ctx_len": 3, "n_contexts": 7, "shard_contexts": 2}
    return ActivationStore.create_or_resume(root, identity, tokens)


def test_rank_records_fold_into_the_manifest_of_one_process(tmp_path: Path) -> None:
    one = _store(tmp_path / "one")
    for i in range(one.n_shards):
        one.write_shard(i, _shard(i))
    ranks = _store(tmp_path / "ranks")
    for rank in (0, 1):
        mine = ActivationStore.open(tmp_path / "ranks")  # each rank holds its own view
        for i in Ranks(rank=rank, world=2).share(range(ranks.n_shards)):
            mine.write_shard(i, _shard(i), rank=rank)
    assert not ranks.complete  # nothing reaches the manifest before rank 0 folds the records in
    ranks.adopt_rank_records()
    assert (tmp_path / "ranks" / MANIFEST).read_bytes() == (tmp_path / "one" / MANIFEST).read_bytes()
    assert not (tmp_path / "ranks" / "ranks").exists()


def test_a_killed_ranks_record_keeps_its_finished_shards_and_redoes_the_rest(tmp_path: Path) -> None:
    store = _store(tmp_path / "s")
    store.write_shard(2, _shard(2), rank=1)  # rank 1 finished shard 2 and died during shard 3
    (tmp_path / "s" / "shards" / "00003.safetensors").write_bytes(b"half a shard")
    (tmp_path / "s" / "ranks" / "00000.json").write_text('{"shards": [')  # a record cut short
    again = ActivationStore.create_or_resume(tmp_path / "s", store.identity, store.tokens)
    assert again.done_shards() == {2}
    assert not (tmp_path / "s" / "shards" / "00003.safetensors").exists()


# -- integration: torchrun on the embedded model ------------------------------------------------------------

STEPS = "engine,per_token"  # harvest, family, engine, per_token: the distributed steps and their readers
TINY = ["--preset", "tiny", "--set", "text.n_contexts=32", "--set", "harvest.shard_contexts=2"]
DEMO_SHAPED = [
    "--preset",
    "demo",
    "--set",
    "text.n_contexts=8",
    "--set",
    "harvest.shard_contexts=2",
    "--set",
    "family.train.epochs=1",
    "--set",
    "engine.power_law_boot=40",  # the bootstrap's refits are a fixed cost, dealt across ranks like the rest
]


def _env() -> dict[str, str]:
    return os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _commands(
    ranks: int, out: Path, args: list[str], steps: str | None = STEPS, nodes: int = 1
) -> list[list[str]]:
    """The processes to start: one (``ranks == 1``), one ``torchrun`` launcher, or one launcher per "node"
    with the rendezvous a SLURM launch uses (``--nnodes``, c10d), all on this machine."""
    tail = ["run", "--out", str(out), "--quiet", *(["--steps", steps] if steps else []), *args]
    if ranks == 1:
        return [[sys.executable, "-m", "darkmatter", *tail]]
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        return [
            [
                *launcher,
                "--nproc-per-node",
                str(ranks),
                "--master-port",
                str(_free_port()),
                "-m",
                "darkmatter",
                *tail,
            ]
        ]
    rdzv = ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "--nnodes", str(nodes)]
    per_node = str(ranks // nodes)
    return [
        [*launcher, *rdzv, "--node-rank", str(i), "--nproc-per-node", per_node, "-m", "darkmatter", *tail]
        for i in range(nodes)
    ]


def _command(ranks: int, out: Path, args: list[str], steps: str | None = STEPS) -> list[str]:
    (command,) = _commands(ranks, out, args, steps)
    return command


def _run(ranks: int, out: Path, args: list[str], steps: str | None = STEPS) -> None:
    _run_together([(ranks, out, args, steps)])


Run = tuple[int, Path, list[str], str | None]


def _run_together(runs: list[Run], nodes: int = 1) -> None:
    """Independent runs side by side (3 single-threaded processes on this 2-core machine beat 1 then 2); a run
    of several ranks starts one launcher per node."""
    procs = [
        subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for n, out, args, steps in runs
        for command in _commands(n, out, args, steps, nodes if n > 1 else 1)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]


def _numbers(x: Any, path: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        return {
            k: v
            for key, item in x.items()
            if key != "provenance"
            for k, v in _numbers(item, f"{path}/{key}").items()
        }
    if isinstance(x, list):
        return {k: v for i, item in enumerate(x) for k, v in _numbers(item, f"{path}[{i}]").items()}
    return {path: x}


def assert_same_store(one: Path, many: Path) -> None:
    """Byte for byte: the manifest, the token ids and every shard."""
    one_store, many_store = one / "store", many / "store"
    files = sorted(p.relative_to(one_store) for p in one_store.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(many_store) for p in many_store.rglob("*") if p.is_file())
    for f in files:
        assert (one_store / f).read_bytes() == (many_store / f).read_bytes(), f


def _sae_files(run: Path) -> list[Path]:
    """Every saved SAE of a run (the family, the layer sweep's, the error SAEs), relative to the run."""
    return sorted(
        p.relative_to(run)
        for p in run.rglob("sae_weights.safetensors")
        if not any(part.startswith(".") for part in p.relative_to(run).parts)
    )


def assert_same_saes(one: Path, many: Path, rtol: float = 1e-5, where: str = "") -> float:
    """Every SAE saved under ``where`` (a folder of the run; default all) within ``rtol`` (relative Frobenius
    norm per tensor); returns the largest difference."""
    from safetensors.torch import load_file

    files = [f for f in _sae_files(one) if f.is_relative_to(where)]
    assert files and files == [f for f in _sae_files(many) if f.is_relative_to(where)]
    worst = 0.0
    for name in files:
        a, b = load_file(one / name), load_file(many / name)
        assert a.keys() == b.keys()
        for key, ta in a.items():
            diff = float((ta.double() - b[key].double()).norm() / ta.double().norm().clamp_min(1e-30))
            assert diff <= rtol, (str(name), key, diff)
            worst = max(worst, diff)
    return worst


TRAINED = ("mlp_probe",)
"""Result keys of numbers that follow a training run (data-parallel training agrees within 1e-5, not 1e-9)."""


def assert_same_results(
    one: Path, many: Path, steps: tuple[str, ...] = ("engine", "per_token"), table: bool = True
) -> float:
    """Every number of ``steps``' results within 1e-9 (relative; 1e-5 for numbers of a trained probe) and,
    with ``table``, the per-token tables equal to float32 precision; returns the largest relative
    difference of the 1e-9 numbers."""
    worst = 0.0
    failures: list[tuple[str, str, float, float, float]] = []
    for name in steps:
        a = _numbers(json.loads((one / "results" / f"{name}.json").read_text()))
        b = _numbers(json.loads((many / "results" / f"{name}.json").read_text()))
        assert {k for k in a if not k.startswith("/notes[")} == {k for k in b if not k.startswith("/notes[")}
        for key, va in a.items():
            vb = b.get(key)
            if key.endswith("seconds") or "per_second" in key or key.startswith("/notes["):
                continue  # times, and the notes in words (a rerun says it reused the layer SAEs)
            if not isinstance(va, float):
                assert va == vb, key
                continue
            rel = abs(va - vb) / max(abs(va), abs(vb), 1e-12)
            trained = any(f"/{t}/" in key for t in TRAINED)
            if rel > (1e-5 if trained else 1e-9):
                failures.append((name, key, va, vb, rel))
            if not trained:
                worst = max(worst, rel)
    assert not failures, failures[:10]
    if not table:
        return worst
    import pyarrow.parquet as pq

    t1, t2 = (
        pq.read_table(one / "tables" / "tokens.parquet"),
        pq.read_table(many / "tables" / "tokens.parquet"),
    )
    assert t1.schema == t2.schema and t1.num_rows == t2.num_rows
    for col in t1.column_names:
        x, y = t1.column(col).to_numpy(zero_copy_only=False), t2.column(col).to_numpy(zero_copy_only=False)
        if x.dtype.kind == "f":
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=0, equal_nan=True)  # float32 columns
        else:
            assert (x == y).all(), col
    return worst


LATER = "pursuit,downstream_ce,earlier_layers,layer_sweep,error_saes,autointerp"
"""The steps after the engine that read the store, the SAEs and the probes."""


def _one_and_two(root: Path, args: list[str], steps: str | None, nodes: int = 1) -> tuple[Path, Path]:
    """``steps`` (None: the whole study) by one process and, side by side, by 2 ranks from scratch."""
    one, two = root / "one", root / "two"
    _run_together([(1, one, args, steps), (2, two, args, steps)], nodes=nodes)
    return one, two


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The whole tiny study by one process and, from scratch, by 2 ranks started as two "nodes" (one
    launcher each, c10d rendezvous, as under SLURM)."""
    return _one_and_two(tmp_path_factory.mktemp("dist"), TINY, None, nodes=2)


@pytest.mark.slow
def test_two_ranks_give_the_tiny_study_of_one_process(tiny_runs: tuple[Path, Path]) -> None:
    """Every step: the store identical, every trained SAE (family, layer sweep, error SAEs) within 1e-5, every
    number of every data-parallel step within 1e-9."""
    one, two = tiny_runs
    assert_same_store(one, two)
    # training is exact (tests/test_exact_training.py); the error SAEs learn components made with the
    # engine's probes, which 2 ranks reproduce to float32 rounding (float64 sums in another order)
    saes = assert_same_saes(one, two)
    later = assert_same_results(one, two, tuple(LATER.split(",")), table=False)
    engine = assert_same_results(one, two)
    parts = sorted(p.name for p in (two / "tables" / "tokens.parquet").iterdir())
    assert parts == ["_parts.json", "part-00000.parquet", "part-00001.parquet"]
    assert (two / "report.html").is_file() and not list((two / "store" / "ranks").glob("*"))
    print(f"SAEs within {saes:.1e}; later steps within {later:.1e}; engine within {engine:.1e}")


@pytest.mark.slow
def test_two_ranks_give_a_demo_shaped_study_of_one_process(tmp_path: Path) -> None:
    """The demo's 10 SAEs: the store identical, the SAEs within 1e-5, the engine's numbers within 1e-9."""
    one, two = _one_and_two(tmp_path, DEMO_SHAPED, STEPS)
    assert_same_store(one, two)
    saes = assert_same_saes(one, two)
    worst = assert_same_results(one, two)
    parts = sorted(p.name for p in (two / "tables" / "tokens.parquet").iterdir())
    assert parts == ["_parts.json", "part-00000.parquet", "part-00001.parquet"]
    print(f"SAEs within {saes:.1e}; results within {worst:.1e}")


def _kill_rank_when(out: Path, ready: Any, timeout: float = 300) -> tuple[int, float]:
    """Start 2 ranks, SIGKILL rank 1 once ``ready(out)``; return the launcher's exit code and the seconds from
    the kill until every process was gone."""
    proc = subprocess.Popen(
        _command(2, out, TINY), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + timeout
    while not ready(out):
        assert proc.poll() is None, "the run ended before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ps = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(proc.pid)], capture_output=True, text=True)
    workers = [int(line.split()[0]) for line in ps.stdout.splitlines() if "darkmatter" in line]
    assert len(workers) == 2
    killed = time.monotonic()
    os.kill(max(workers), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    gone = time.monotonic() - killed
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert "error" in err
    return proc.returncode, gone


@pytest.mark.slow
def test_a_rank_killed_in_the_harvest_or_the_engine_stops_all_and_resumes(
    tiny_runs: tuple[Path, Path], tmp_path: Path
) -> None:
    def harvesting(out: Path) -> bool:
        return any((out / "store" / "ranks").glob("*.json"))

    def in_engine(out: Path) -> bool:
        return any((out / "tables").glob(".engine-spill-*"))

    out = tmp_path / "run"
    code, seconds = _kill_rank_when(out, harvesting)
    assert code != 0 and seconds < 60, ("harvest", code, seconds)
    assert not ActivationStore.open(out / "store").complete
    code, seconds = _kill_rank_when(out, in_engine)  # the rerun resumes the harvest, then dies in the engine
    assert code != 0 and seconds < 60, ("engine", code, seconds)
    assert ActivationStore.open(out / "store").complete and not (out / "results" / "engine.json").exists()
    _run(2, out, TINY)
    assert_same_store(tiny_runs[1], out)
    assert_same_saes(
        tiny_runs[1], out, rtol=0.0, where="saes"
    )  # the same ranks train the same SAEs, bit for bit
    assert_same_results(tiny_runs[1], out, ("family", "engine", "per_token"))


# Data-parallel training in process (2 and 3 gloo ranks against one process): tests/test_exact_training.py.

TRAIN_SITE = "blocks.0.hook_resid_post"


# -- the family's held-out quality pass, in process: 2 gloo ranks against one process --------------------


def _quality(store_path: Path, rank: int, world: int, init: str) -> dict[str, dict[str, float]]:
    """Held-out FVU, nMSE, L0 and dead fraction of two seeded TopK SAEs, as ``rank`` of ``world``."""
    import torch.distributed as dist

    from darkmatter.sae import SAE
    from darkmatter.sae.config import SAEConfig
    from darkmatter.sae.quality import evaluate_saes
    from darkmatter.stats import Split

    torch.set_num_threads(1)
    ranks = Ranks()
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
        ranks = Ranks(rank=rank, world=world, backend="gloo")
    gen = torch.Generator().manual_seed(3)
    saes = {}
    for width in (16, 64):
        cfg = SAEConfig(d_in=12, d_sae=width, activation="topk", k=2, hook_site=TRAIN_SITE)
        w = torch.randn(width, 12, generator=gen) / 4
        tensors = {
            "W_enc": w.T.contiguous(),
            "b_enc": torch.zeros(width),
            "W_dec": w,
            "b_dec": torch.zeros(12),
        }
        saes[f"w{width}"] = SAE.from_tensors(cfg, tensors)
    store = ActivationStore.open(store_path)
    out = evaluate_saes(store, saes, split=Split(seed=0, fraction=0.5), batch_tokens=100, ranks=ranks)
    if world > 1:
        dist.barrier()  # no rank leaves while another still talks to it (gloo can abort at exit otherwise)
        dist.destroy_process_group()
    return out


def _quality_main(rank: int, store_path: Path, init: str, out: Path) -> None:
    result = _quality(store_path, rank, 2, init)
    out.with_name(f"{out.stem}-{rank}.json").write_text(json.dumps(result))


def test_the_quality_pass_on_two_ranks_measures_what_one_process_does(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    from synthetic import sparse_features, synthetic_store

    store = tmp_path / "store"
    synthetic_store(store, sparse_features(d=12, n_features=24, active=2), n_contexts=20, shard_contexts=4)
    one = _quality(store, 0, 1, "")
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_quality_main, args=(store, init, tmp_path / "q.json"), nprocs=2, join=True)
    for rank in (0, 1):  # every rank returns the whole store's numbers
        two = json.loads((tmp_path / f"q-{rank}.json").read_text())
        assert two.keys() == one.keys()
        for name, numbers in one.items():
            assert (
                numbers["tokens"] == two[name]["tokens"]
                and numbers["dead_fraction"] == two[name]["dead_fraction"]
            )
            for key, value in numbers.items():
                assert abs(value - two[name][key]) <= 1e-9 * max(abs(value), 1e-12), (name, key)
