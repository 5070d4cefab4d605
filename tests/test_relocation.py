"""A run folder is self-contained: copied or moved elsewhere, it rebuilds its report and resumes from its
own files (results hold paths relative to the run folder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from darkmatter.cli import main

from conftest import tiny_study_overrides

pytestmark = pytest.mark.slow


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "results").glob("*.json")}


def test_a_moved_run_resumes_from_its_own_files(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path
) -> None:
    sets = [a for item in tiny_study_overrides(tiny_model_dir, corpus_file) for a in ("--set", item)]
    first = tmp_path / "first"
    assert main(["run", "--out", str(first), "--quiet", *sets]) == 0
    text = "\n".join(p.read_text() for p in (first / "results").glob("*.json"))
    assert str(first) not in text  # no result names the folder it was written in
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(str(first), str(moved))  # the original folder no longer exists
    (moved / "report.html").unlink()
    assert main(["report", str(moved)]) == 0 and (moved / "report.html").is_file()
    before = _mtimes(moved)
    (moved / "results" / "pursuit.json").unlink()
    assert main(["run", "--out", str(moved), "--quiet", *sets]) == 0
    after = _mtimes(moved)
    assert {n for n in before if n != "pursuit.json" and after[n] != before[n]} == set()
    pursuit = json.loads((moved / "results" / "pursuit.json").read_text())
    assert [r["name"] for r in pursuit["saes"]] == ["L1.resid.w16.k4", "L1.resid.w32.k4"]
    family = json.loads((moved / "results" / "family.json").read_text())
    assert all(not Path(r["path"]).is_absolute() for r in family["saes"])
