"""Harvest, engine and downstream-CE throughput under ``torchrun``: 2 ranks x 1 thread against 1 x 1.

Both runs are launched from here (same machine, same process tree, one after the other) on a demo-shaped
study: the embedded SmolLM2, the demo's 10-SAE family, fewer contexts. Each worker loads the model before
the clock starts, then times the harvest step, the family step (data-parallel; not a target), the
engine step and the downstream CE splices (whole batches of held-out contexts dealt to the ranks). Prints
tokens/s per run and the ratios, whether the stores are identical, how far the trained SAEs differ, and
the largest relative difference of the CE results.

    python bench/bench_distributed.py [--contexts 128] [--ce-contexts 16] [--ranks 2]
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


def worker(out: Path, contexts: int, ce_contexts: int, report: Path) -> None:
    """One rank: load the model, then time harvest, family, engine and CE (rank 0 writes the timings)."""
    import torch

    from darkmatter.config import resolve_config
    from darkmatter.ranks import from_environment, shutdown
    from darkmatter.runner import Runner
    from darkmatter.study.context import StudyContext
    from darkmatter.study.steps.downstream_ce import DOWNSTREAM_CE
    from darkmatter.study.steps.engine import ENGINE
    from darkmatter.study.steps.family import FAMILY
    from darkmatter.study.steps.harvest import HARVEST

    torch.set_num_threads(1)
    sets = [*SETS, f"text.n_contexts={contexts}", f"downstream_ce.n_contexts={ce_contexts}"]
    cfg = resolve_config("demo", None, sets)
    ranks = from_environment("cpu")
    ctx = StudyContext(cfg, out, log=lambda m: None, ranks=ranks)
    ctx.lm  # noqa: B018 - the weights load before the clock starts
    seconds: dict[str, float] = {}
    for step in (HARVEST, FAMILY, ENGINE, DOWNSTREAM_CE):
        ranks.barrier()
        t0 = time.perf_counter()
        Runner(ctx, [step], check=False).run(report=False)
        seconds[step.name] = time.perf_counter() - t0
    if ranks.leader:
        tokens = ctx.store.n_contexts * ctx.store.ctx_len
        ce_tokens = ce_contexts * ctx.store.ctx_len
        report.write_text(
            json.dumps({"seconds": seconds, "tokens": tokens, "ce_tokens": ce_tokens, "world": ranks.world})
        )
    shutdown(ranks)


def launch(n: int, out: Path, contexts: int, ce_contexts: int) -> dict[str, object]:
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
        "--ce-contexts",
        str(ce_contexts),
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


def result_difference(one: Path, many: Path) -> float:
    """The largest relative difference between two result files' numbers (times left out)."""

    def numbers(x: object, path: str = "") -> dict[str, float]:
        if isinstance(x, dict):
            return {k: v for key, item in x.items() for k, v in numbers(item, f"{path}/{key}").items()}
        if isinstance(x, list):
            return {k: v for i, item in enumerate(x) for k, v in numbers(item, f"{path}[{i}]").items()}
        return {path: float(x)} if isinstance(x, float) and "seconds" not in path else {}

    a, b = numbers(json.loads(one.read_text())), numbers(json.loads((many / one.name).read_text()))
    return max((abs(v - b[k]) / max(abs(v), 1e-12) for k, v in a.items() if k in b), default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--contexts", type=int, default=128)
    parser.add_argument("--ce-contexts", type=int, default=16)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--worker", type=Path)
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.contexts, args.ce_contexts, args.report)
        return
    root = Path(tempfile.mkdtemp(prefix="bench-distributed-"))
    try:
        one = launch(1, root / "one", args.contexts, args.ce_contexts)
        many = launch(args.ranks, root / "many", args.contexts, args.ce_contexts)
        print(f"{one['tokens']} tokens; 1 rank x 1 thread vs {args.ranks} ranks x 1 thread")
        for step in ("harvest", "family", "engine", "downstream_ce"):
            t1, tn = one["seconds"][step], many["seconds"][step]  # type: ignore[index]
            tokens = one["ce_tokens" if step == "downstream_ce" else "tokens"]
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
        ce = result_difference(root / "one" / "results" / "downstream_ce.json", root / "many" / "results")
        print(f"downstream CE (same model, contexts; 2-rank SAEs): max relative difference {ce:.2e}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
