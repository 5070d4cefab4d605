"""The paper-dimension stand-in bench (bench/bench_paper_scale.py) end to end on a downsized model: every
step runs through the library, and the printed figures parse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import darkmatter

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_paper_scale.py"
STEPS = ("harvest", "family", "engine", "per_token", "pursuit", "downstream_ce")


def _results(stdout: str) -> list[dict[str, str]]:
    rows = []
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            rows.append(dict(item.split("=", 1) for item in line.removeprefix("RESULT ").split(" ")))
    return rows


def _number(value: str) -> float | None:
    return None if value == "-" else float(value)


@pytest.mark.skipif(not BENCH.is_file(), reason="bench/ is not shipped with the package")
def test_paper_scale_bench_on_a_tiny_stand_in(tmp_path: Path) -> None:
    src = str(Path(darkmatter.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(BENCH), "--model", "tiny-gemma-2", "--tokens", "384", "--ctx-len", "128"]
    cmd += ["--device", "cpu", "--budget-gb", "4", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "widths are SCALED" in done.stdout
    rows = _results(done.stdout)
    steps = {r["step"]: r for r in rows if "step" in r}
    assert set(STEPS) <= set(steps)
    for name in STEPS:
        r = steps[name]
        assert float(r["seconds"]) > 0 and float(r["tokens_per_s"]) > 0
        assert float(r["peak_rss_gb"]) > 0.05  # VmHWM of the whole interpreter, reset per step
        assert r["peak_device_gb"] == "-"  # no CUDA memory on the CPU
        for key in ("plan_seconds", "plan_peak_host_gb", "plan_peak_device_gb", "plan_groups"):
            assert key in r
            _number(r[key])  # a number, or '-' without the planner
    for name in ("harvest", "engine"):
        assert 0 < float(steps[name]["flop_fraction"]) < 2
    peaks = next(r for r in rows if "fp32_peak_gflops" in r)
    assert float(peaks["fp32_peak_gflops"]) > 0
    budget = next(r for r in rows if "budget_gb" in r)
    assert float(budget["budget_gb"]) == 4 and budget["status"] in ("PASS", "FAIL")
    saes = [r for r in rows if "sae" in r]
    assert len(saes) == 2 and all(float(r["l0"]) > 0 for r in saes)
    assert (tmp_path / "result.json").is_file()
