"""Damaged or missing files in a run folder: each is either detected and redone by the next run, or refused
with one line naming the file and saying what to do (exit 2), after which doing that resumes the run.

A case damages a copy of the clean run's folder (or of its snapshot before a step that reads the file), runs
the same command, and records which of the two happened; the final results must equal the clean run's.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faultlib
import pytest
from fault_fixtures import suite_fixture, table_fixture  # noqa: F401  (the session fixtures)
from faultlib import Collector, Suite

pytestmark = pytest.mark.slow


def flip(path: Path) -> None:
    """Invert 64 bytes in the middle of the file (size unchanged)."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b'{"not": "what was here\x00\xff')


def delete(path: Path) -> None:
    path.unlink()


@dataclass(frozen=True)
class Case:
    name: str
    start: str  # "clean", or the step before which the clean run's folder is copied
    file: str
    damage: Callable[[Path], None]
    expected: str  # "redone" or "refused"
    advice: str = ""  # for a refusal: what its message must say to do; the test then deletes ``remedy``
    remedy: str = ""  # default: ``file``


SHARD = "store/shards/00001.safetensors"
CASES = [
    Case("corrupted store shard", "family", SHARD, flip, "refused", "Delete it and run the same harvest"),
    Case("missing store shard", "clean", SHARD, delete, "redone"),
    Case(
        "corrupt store token ids", "family", "store/tokens.npy", flip, "refused", "Delete the folder", "store"
    ),
    Case(
        "missing store token ids",
        "family",
        "store/tokens.npy",
        delete,
        "refused",
        "Delete the folder",
        "store",
    ),
    Case(
        "corrupt store manifest",
        "clean",
        "store/manifest.json",
        garbage,
        "refused",
        "Delete the store",
        "store",
    ),
    Case(
        "truncated SAE weight file",
        "clean",
        "saes/L1.resid.w32.k4/sae_weights.safetensors",
        truncate,
        "redone",
    ),
    Case("corrupt SAE config", "clean", "saes/L1.resid.w16.k4/cfg.json", garbage, "redone"),
    Case("corrupt result file", "clean", "results/engine.json", garbage, "redone"),
    Case("missing result file", "clean", "results/synthetic.json", delete, "redone"),
    Case("corrupt per-token table", "clean", "tables/tokens.parquet", truncate, "redone"),
    Case("deleted error probe", "clean", "probes/L1.resid.w32.k4.safetensors", delete, "redone"),
    Case("truncated norm Grams", "clean", "engine/norm_grams.safetensors", truncate, "redone"),
    Case(
        "truncated error-SAE weights",
        "clean",
        "error_saes/linear/sae_weights.safetensors",
        truncate,
        "redone",
    ),
    Case("corrupt figure stamps", "clean", "figures/.drawn.json", garbage, "redone"),
    Case("deleted figure", "clean", "figures/synthetic.png", delete, "redone"),
]


def _store(out: Path) -> dict[str, str]:
    return {p: d for p, d in faultlib.digests(out).items() if p.startswith("store/")}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_damage_is_redone_or_refused_with_advice(suite: Suite, table: Collector, case: Case) -> None:
    out = suite.case_dir("damage", suite.clean if case.start == "clean" else suite.before(case.start))
    path = out / case.file
    case.damage(path)
    damaged = path.read_bytes() if path.exists() else None
    first = suite.zygote.run(suite.args(out))
    final, problems = first, []
    observed = "redone" if first.code == 0 else "refused"
    if observed == "refused":
        problems = faultlib.stderr_problems(first.stderr)
        problems += [] if first.code == 2 else [f"exit {first.code}"]
        problems += [] if path.name in first.stderr else ["the file is not named"]
        problems += [] if case.advice and case.advice in first.stderr else ["not the expected advice"]
        remedy = out / (case.remedy or case.file)
        if remedy.exists():  # do what the message says
            shutil.rmtree(remedy) if remedy.is_dir() else remedy.unlink()
        final = suite.zygote.run(suite.args(out))
    diffs = faultlib.result_diffs(suite.want, out) if final.code == 0 else []
    repaired = path.exists() and path.read_bytes() != damaged
    store_same = not case.file.startswith("store/") or _store(out) == _store(suite.clean)
    steps = [s for s in first.record.get("events", {}) if s != "report"]
    said = first.stderr.strip().split(": error: ")[-1].replace(str(out) + "/", "")
    ok = (
        observed == case.expected
        and not problems
        and final.code == 0
        and not diffs
        and repaired
        and store_same
    )
    table.add(
        f"{case.name} ({case.file}, {case.damage.__name__})",
        "corruption",
        case.expected + (f": '{case.advice}...', done" if case.advice else ""),
        (f"refused: {said[:120]}" if observed == "refused" else f"redone ({', '.join(steps)} ran)")
        + f"; final exit {final.code}, {len(diffs)} differing values"
        + ("" if repaired else ", file not rewritten")
        + ("" if store_same else ", store differs from the clean one"),
        ok,
    )
    assert observed == case.expected, first.stderr
    assert not problems, (problems, first.stderr)
    assert final.code == 0, final.stderr[-3000:]
    assert not diffs, diffs[:10]
    assert repaired, f"{case.file} was not written again"
    assert store_same, "the store is not byte-identical to the clean run's"
