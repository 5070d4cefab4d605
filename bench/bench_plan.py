"""The planner against a measured run: per step, planned / measured seconds and peak RSS.

Runs a small study in this process (default: the tiny preset; ``--preset demo --set text.n_contexts=64``
for a reduced demo), timing every step (wall and CPU seconds) and reading its own peak RSS (``VmHWM``, reset
before each step through ``/proc/self/clear_refs``), then prints the plan's numbers beside them as ratios.
On a machine shared with other work, wall time grows with the load; the CPU column (CPU seconds over the
threads torch uses) is what an idle machine's wall time would be for the parallel parts.

    python bench/bench_plan.py [--preset tiny] [--set KEY=VALUE ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from darkmatter.config import resolve_config
from darkmatter.runner import Runner
from darkmatter.study.context import StudyContext
from darkmatter.study.plan import format_plan, plan_study


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(cfg: Any, out: Path) -> dict[str, dict[str, float]]:
    ctx = StudyContext(cfg, out, log=lambda m: print(m, file=sys.stderr, flush=True))
    runner = Runner(ctx, check=False)
    rows: dict[str, dict[str, float]] = {}
    for step in runner.steps:
        original = step.run

        def timed(c: StudyContext, _run: Any = original, _name: str = step.name) -> Any:
            reset_peak()
            t0, c0 = time.perf_counter(), cpu_seconds()
            result = _run(c)
            rows[_name] = {
                "seconds": time.perf_counter() - t0,
                "cpu_seconds": cpu_seconds() - c0,
                "peak_rss": peak_rss(),
            }
            return result

        step.run = timed  # type: ignore[method-assign]
    try:
        runner.run(report=False)
    finally:
        for step in runner.steps:
            step.__dict__.pop("run", None)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    cfg = resolve_config(args.preset, None, args.sets)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-plan-"))
    plan = plan_study(cfg, out)
    print(format_plan(plan, legend=False))
    measured = measure(cfg, out)
    threads = torch.get_num_threads()
    print(
        f"\n{'step':<15} {'plan s':>8} {'wall s':>8} {'cpu/thr':>8} {'plan/wall':>9} {'plan/cpu':>8} "
        f"{'plan RSS':>9} {'RSS':>9} {'ratio':>6}"
    )
    tot = {"plan": 0.0, "wall": 0.0, "cpu": 0.0}
    for s in plan.steps:
        m = measured.get(s.name)
        if m is None:
            continue
        cpu = m["cpu_seconds"] / threads
        tot["plan"] += s.seconds
        tot["wall"] += m["seconds"]
        tot["cpu"] += cpu
        print(
            f"{s.name:<15} {s.seconds:8.1f} {m['seconds']:8.1f} {cpu:8.1f} {s.seconds / m['seconds']:9.2f} "
            f"{s.seconds / max(cpu, 1e-9):8.2f} {s.peak_host_bytes / 2**20:8.0f}M "
            f"{m['peak_rss'] / 2**20:8.0f}M {s.peak_host_bytes / m['peak_rss']:6.2f}"
        )
    peak = max(m["peak_rss"] for m in measured.values())
    print(
        f"{'total':<15} {tot['plan']:8.1f} {tot['wall']:8.1f} {tot['cpu']:8.1f} "
        f"{tot['plan'] / tot['wall']:9.2f} {tot['plan'] / tot['cpu']:8.2f} "
        f"{plan.peak_host_bytes / 2**20:8.0f}M {peak / 2**20:8.0f}M {plan.peak_host_bytes / peak:6.2f}"
    )
    (out / "bench_plan.json").write_text(json.dumps({"measured": measured}, indent=1))


if __name__ == "__main__":
    main()
