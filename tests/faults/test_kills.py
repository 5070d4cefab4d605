"""SIGKILL at 20 seeded moments spread over every stage of the tiny study; each resumes to the clean results.

A moment is (stage, n): the n-th event of that stage (an atomic commit, before or after its rename, or a
progress callback), counted in the clean run, so where a kill lands depends on the study's progress and
not on the machine's speed. Every stage gets one kill, the other eight go to stages drawn with a fixed
seed in proportion to their events. A kill inside stage S starts from the clean run's folder as it was
when the stages before S were done; the same command then finishes the run, and its results must equal the
clean run's, with no temporary file left.
"""

from __future__ import annotations

import random

import faultlib
import pytest
from fault_fixtures import suite_fixture, table_fixture  # noqa: F401  (the session fixtures)
from faultlib import STAGES, Collector, Suite

pytestmark = pytest.mark.slow

N_KILLS = 20
SEED = 20241017


def kill_moments(events: dict[str, int], n: int = N_KILLS, seed: int = SEED) -> list[tuple[str, int]]:
    """``n`` distinct (stage, event) pairs: one in each stage, the rest drawn in proportion to events."""
    rng = random.Random(seed)
    moments = [(stage, rng.randrange(events[stage])) for stage in STAGES]
    while len(moments) < n:
        stage = rng.choices(STAGES, weights=[events[s] for s in STAGES])[0]
        moment = (stage, rng.randrange(events[stage]))
        if moment not in moments:
            moments.append(moment)
    return sorted(moments, key=lambda m: (STAGES.index(m[0]), m[1]))


def test_every_stage_has_events(suite: Suite) -> None:
    missing = [s for s in STAGES if suite.events.get(s, 0) < 1]
    assert not missing, f"stages with no event to kill at: {missing} ({suite.events})"


@pytest.mark.parametrize("i", range(N_KILLS))
def test_killed_run_resumes_to_the_clean_results(suite: Suite, table: Collector, i: int) -> None:
    stage, event = kill_moments(suite.events)[i]
    total = suite.events[stage]
    out = suite.case_dir(f"kill-{stage}-{event}", suite.before(stage))
    args = suite.args(out)
    killed = suite.zygote.run(args, kill={"stage": stage, "event": event})
    finished = suite.zygote.run(args)
    diffs = faultlib.result_diffs(suite.want, out) if finished.code == 0 else []
    leftovers = faultlib.temporaries(out)
    observed = (
        f"{'SIGKILL' if killed.killed else f'exit {killed.code}'}; rerun exit {finished.code}; "
        f"{len(diffs)} differing values; {len(leftovers)} temporary files"
    )
    ok = killed.killed and finished.code == 0 and not diffs and not leftovers
    table.add(
        f"kill in {stage} at event {event + 1} of {total} ({suite.labels[stage][event]})",
        "kill",
        "SIGKILL; rerun exit 0, results equal, no .tmp",
        observed,
        ok,
    )
    assert killed.killed, f"the run ended ({killed.code}) before event {event} of {stage}: {killed.stderr}"
    assert finished.code == 0, finished.stderr[-3000:]
    assert not diffs, diffs[:10]
    assert not leftovers, leftovers
