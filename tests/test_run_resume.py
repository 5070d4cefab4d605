"""``darkmatter run`` killed (SIGKILL) inside each step resumes to the same results as an uninterrupted run.

Each kill happens at an atomic rename (the moment a step commits a file): the child process wraps
``Path.replace``/``Path.rename`` and kills itself at the n-th rename whose target matches a pattern, before
or after performing it. The same output directory is killed at one point per step in turn, then the run
is completed and every result is compared with a clean run's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import json_diffs, strip_volatile, tiny_study_overrides

CHILD = r"""
import os, signal, sys
from pathlib import Path
pattern, nth, when = os.environ["KILL_AT"].split("|")
nth = int(nth)
seen = [0]

def wrap(method):
    original = getattr(Path, method)
    def patched(self, target):
        if pattern in str(target):
            seen[0] += 1
            if seen[0] == nth and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
        result = original(self, target)
        if pattern in str(target) and seen[0] == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(Path, method, patched)

wrap("replace")
wrap("rename")
from darkmatter.cli import main
sys.exit(main(sys.argv[1:]))
"""

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


def _env(kill_at: str | None) -> dict[str, str]:
    import os

    # one thread each: the clean run goes on beside the killed ones, and both see the same arithmetic
    return os.environ | {
        "KILL_AT": kill_at or "never|0|before",
        "PYTHONPATH": str(Path(__file__).parent),
        "OMP_NUM_THREADS": "1",
    }


def _run(args: list[str], kill_at: str | None = None) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=_env(kill_at), capture_output=True, text=True, timeout=600
    )
    if kill_at is None or proc.returncode != -signal.SIGKILL:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode


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
    clean_run = subprocess.Popen(
        [sys.executable, "-c", CHILD, "run", "--out", str(clean), "--quiet", *sets],
        env=_env(None),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        kills = 0
        for pattern, nth, when in KILL_POINTS:
            code = _run(["run", "--out", str(killed), "--quiet", *sets], f"{pattern}|{nth}|{when}")
            kills += code == -signal.SIGKILL
            assert code == -signal.SIGKILL, f"the run finished before reaching {pattern!r}"
        _run(["run", "--out", str(killed), "--quiet", *sets])
        assert kills == len(KILL_POINTS)
    except BaseException:
        clean_run.kill()
        raise
    _, err = clean_run.communicate(timeout=600)
    assert clean_run.returncode == 0, err[-3000:]
    want, got = _results(clean), _results(killed)
    assert set(got) == set(want)
    diffs = [d for name in want for d in json_diffs(want[name], got[name], name)]
    assert not diffs, diffs[:10]
    assert (killed / "report.html").is_file()
    leftovers = [p for p in killed.rglob("*.tmp")]
    assert not leftovers, leftovers
