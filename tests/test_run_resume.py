"""``darkmatter run`` killed (SIGKILL) inside each step resumes to the same results as an uninterrupted run.

Each kill happens at an atomic rename (the moment a step commits a file): the child process wraps
``Path.replace``/``Path.rename`` and kills itself at the n-th rename whose target matches a pattern, before
or after performing it. The same output directory is killed at one point per step in turn, then the run
is completed and every result is compared with a clean run's. Every run is a child forked from one process
that imported darkmatter once (the fault suite's fork server), so a run costs its own work.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import json_diffs, strip_volatile, tiny_study_overrides

sys.path.insert(0, str(Path(__file__).parent / "faults"))
from faultlib import Zygote

# (target pattern, n-th matching rename, before/after): one point inside each step of the run.
KILL_POINTS = [
    ("shards/00001", 1, "before"),  # harvest: second shard
    ("sae_weights.safetensors", 2, "after"),  # family: some SAEs saved, others not
    ("engine.json", 1, "before"),  # engine: probes and the per-token table written, its result not
    ("per_token.json", 1, "before"),
    ("saes_layers/", 1, "after"),  # layer sweep: first layer SAE in place
    ("synthetic.json", 1, "before"),
    ("pursuit.json", 1, "after"),
    ("downstream_ce.json", 1, "before"),
    ("earlier_layers.json", 1, "before"),
    ("autointerp-linear.json", 1, "after"),  # error SAEs trained, auto-interp part-way
    ("report.html", 1, "before"),
]


def _results(out: Path) -> dict[str, Any]:
    return {
        p.stem: strip_volatile(json.loads(p.read_text())) for p in sorted((out / "results").glob("*.json"))
    }


@pytest.mark.slow
def test_killed_at_every_step_resumes_to_the_same_results(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    sets = [a for item in tiny_study_overrides(tiny_model_dir, corpus_file) for a in ("--set", item)]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    zygote = Zygote(tmp_path / "zygote", os.environ | {"OMP_NUM_THREADS": "1"})
    try:
        clean_run = zygote.start(["run", "--out", str(clean), "--quiet", *sets])  # beside the killed runs
        for pattern, nth, when in KILL_POINTS:
            kill = {"pattern": pattern, "nth": nth, "when": when}
            run = zygote.run(["run", "--out", str(killed), "--quiet", *sets], kill_at_rename=kill)
            assert run.killed, f"the run ended ({run.code}) before reaching {pattern!r}: {run.stderr[-3000:]}"
        finished = zygote.run(["run", "--out", str(killed), "--quiet", *sets])
        assert finished.code == 0, finished.stderr[-3000:]
        done = zygote.wait(clean_run)
        assert done.code == 0, done.stderr[-3000:]
    finally:
        zygote.close()
    want, got = _results(clean), _results(killed)
    assert set(got) == set(want)
    diffs = [d for name in want for d in json_diffs(want[name], got[name], name)]
    assert not diffs, diffs[:10]
    assert (killed / "report.html").is_file()
    leftovers = [p for p in killed.rglob("*.tmp")]
    assert not leftovers, leftovers
