"""Harvest and engine throughput under ``torchrun``: 2 ranks x 1 thread against 1 rank x 1 thread.

Both runs are launched from here (same machine, same process tree, one after the other) on a demo-shaped
study: the embedded SmolLM2, the demo's 10-SAE family, fewer contexts. Each worker loads the model before
the clock starts, then times the harvest step, the family step (data-parallel; not a target) and the
engine step. Prints tokens/s per run and the ratios, whether the stores are identical, and how far the
trained SAEs differ.

    python bench/bench_distributed.py [--contexts 128] [--ranks 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETS = [
    "text.ctx_len=256",
    "harvest.shard_contexts=4",
    "family.train.epochs=1",
]


def worker(out: Path, contexts: int, report: Path) -> None:
    """One rank: load the model, then time harvest, family and engine (rank 0 writes the timings)."""
    import torch

    from darkmatter.config import resolve_config
    from darkmatter.ranks import from_environment, shutdown
    from darkmatter.runner import Runner
    from darkmatter.study.context import StudyContext
    from darkmatter.study.steps.engine import ENGINE
    from darkmatter.study.steps.family import FAMILY
    from darkmatter.study.steps.harvest import HARVEST

    torch.set_num_threads(1)
    cfg = resolve_config("demo", None, [*SETS, f"text.n_contexts={contexts}"])
    ranks = from_environment("cpu")
    ctx = StudyContext(cfg, out, log=lambda m: None, ranks=ranks)
    ctx.lm  # noqa: B018 - the weights load before the clock starts
    seconds: dict[str, float] = {}
    for step in (HARVEST, FAMILY, ENGINE):
        ranks.barrier()
        t0 = time.perf_counter()
        Runner(ctx, [step], check=False).run(report=False)
        seconds[step.name] = time.perf_counter() - t0
    if ranks.leader:
        tokens = ctx.store.n_contexts * ctx.store.ctx_len
        report.write_text(json.dumps({"seconds": seconds, "tokens": tokens, "world": ranks.world}))
    shutdown(ranks)


def launch(n: int, out: Path, contexts: int) -> dict[str, object]:
    report = out.with_suffix(".json")
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(n),
        __file__,
        "--worker",
        str(out),
        "--contexts",
        str(contexts),
        "--report",
        str(report),
    ]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{n} rank(s) failed:\n{proc.stderr[-4000:]}")
    return json.loads(report.read_text())  # type: ignore[no-any-return]


def sae_difference(a: Path, b: Path) -> float:
    """The largest relative difference (norm of each tensor) between the two runs' trained SAEs."""
    from safetensors.torch import load_file

    worst = 0.0
    for path in sorted((a / "saes").glob("*/sae_weights.safetensors")):
        ta, tb = load_file(path), load_file(b / path.relative_to(a))
        for key, x in ta.items():
            worst = max(worst, float((x.double() - tb[key].double()).norm() / x.double().norm()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, default=128)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--worker", type=Path)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.contexts, args.report)
        return
    root = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    try:
        one = launch(1, root / "one", args.contexts)
        many = launch(args.ranks, root / "many", args.contexts)
        tokens = one["tokens"]
        print(f"{tokens} tokens; 1 rank x 1 thread vs {args.ranks} ranks x 1 thread")
        for step in ("harvest", "family", "engine"):
            t1, tn = one["seconds"][step], many["seconds"][step]  # type: ignore[index]
            note = " (not a target: data-parallel training of small SAEs)" if step == "family" else ""
            print(
                f"{step:<8} {t1:7.1f} s vs {tn:7.1f} s  ratio {t1 / tn:4.2f}x  "
                f"({tokens / t1:,.0f} vs {tokens / tn:,.0f} tok/s){note}"
            )
        same_store = subprocess.run(
            ["diff", "-rq", root / "one" / "store", root / "many" / "store"]
        ).returncode
        print(f"stores identical: {same_store == 0}")
        print(f"trained SAEs: max relative difference {sae_difference(root / 'one', root / 'many'):.2e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
