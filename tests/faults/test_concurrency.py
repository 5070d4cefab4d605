"""Two runs on one folder at once: the second is refused within 10 s naming the first one's PID, and the
first, held inside its family step meanwhile, finishes normally with the clean results."""

from __future__ import annotations

import subprocess
import sys
import time

import faultlib
import pytest
from fault_fixtures import suite_fixture, table_fixture  # noqa: F401  (the session fixtures)
from faultlib import Collector, Suite

pytestmark = pytest.mark.slow

LIMIT_S = 10.0


def test_a_second_run_on_a_busy_folder_is_refused_naming_the_first(suite: Suite, table: Collector) -> None:
    out = suite.case_dir("busy", suite.before("family"))
    gate, held = suite.root / "busy.gate", suite.root / "busy.held"
    hold = {"stage": "family", "event": 0, "gate": str(gate), "held": str(held)}
    first = suite.zygote.start(suite.args(out), hold=hold)
    try:
        deadline = time.monotonic() + 60
        while not held.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert held.exists(), "the first run never reached its family step"
        t0 = time.perf_counter()
        second = subprocess.run(  # a fresh interpreter, as a user would start it
            [sys.executable, "-m", "darkmatter", *suite.args(out)],
            capture_output=True,
            text=True,
            env=suite.env,
            timeout=60,
        )
        seconds = time.perf_counter() - t0
        report = suite.zygote.run(["report", str(out)], timeout=30)  # the report command takes the lock too
    finally:
        gate.touch()
    done = suite.zygote.wait(first)
    diffs = faultlib.result_diffs(suite.want, out) if done.code == 0 else []
    pid = f"PID {first['pid']}"
    rows = [
        ("a second `run` on the folder (fresh interpreter)", second.returncode, second.stderr, seconds),
        ("`report` on the folder", report.code, report.stderr, report.seconds),
    ]
    for name, code, err, secs in rows:
        problems = faultlib.stderr_problems(err) + ([] if pid in err else [f"no {pid}"])
        table.add(
            f"{name} while a run holds it",
            "concurrency",
            f"exit 2 within {LIMIT_S:.0f} s naming the first run's PID; the first finishes, results equal",
            f"exit {code} in {secs:.1f} s: {err.strip()[:110]}; first run exit {done.code}, "
            f"{len(diffs)} differing values",
            code == 2 and not problems and secs < LIMIT_S and done.code == 0 and not diffs,
        )
        assert code == 2 and not problems, (problems, err)
        assert secs < LIMIT_S
    assert done.code == 0, done.stderr[-3000:]
    assert not diffs, diffs[:10]
