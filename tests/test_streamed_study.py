"""A study with its SAEs streamed one per group gives the results of the study with every SAE at once."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from darkmatter.cli import main
from darkmatter.study.budget import GB, sae_cost

from conftest import strip_volatile, tiny_study_overrides

# the steps whose SAEs are grouped, and what the others need of them; pursuit holds each SAE twice (its
# pursuit twin has moments of its own), so it gets a budget of its own, rerun on the same folder
ENGINE_STEPS = "harvest,family,engine,per_token"
PURSUIT_STEPS = "pursuit,downstream_ce"


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _diffs(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two JSON values differ beyond 1e-9 (relative, or absolute near 0)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _diffs(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _diffs(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return []
        return [] if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) else [f"{where}: {a} vs {b}"]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def _run(out: Path, steps: str, sets: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["run", "--out", str(out), "--steps", steps, *_sets(sets)]) == 0
    captured = capsys.readouterr()
    return captured.out + captured.err


@pytest.mark.slow
def test_one_sae_per_group_equals_all_at_once(
    tmp_path: Path, tiny_model_dir: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [*tiny_study_overrides(tiny_model_dir, corpus_file), "analysis.device=cpu"]
    # room for the largest SAE (d 64, 32 latents, 3 jackknife blocks) but never for two; pursuit likewise
    engine_room = 1.5 * sae_cost(64, 32, dtype_bytes=4, blocks=3) / GB
    pursuit_room = 1.05 * sae_cost(64, 32, dtype_bytes=4, blocks=3, copies=2) / GB
    whole, streamed = tmp_path / "whole", tmp_path / "streamed"
    _run(whole, f"{ENGINE_STEPS},{PURSUIT_STEPS}", base, capsys)
    log = _run(streamed, ENGINE_STEPS, [*base, f"resources.sae_memory_gb={engine_room:.9f}"], capsys)
    assert "engine: SAEs streamed in 3 groups (1, 1, 1 SAEs)" in log
    log = _run(streamed, PURSUIT_STEPS, [*base, f"resources.sae_memory_gb={pursuit_room:.9f}"], capsys)
    assert "pursuit: SAEs streamed in 2 groups (1, 1 SAEs)" in log

    results = sorted(p.name for p in (whole / "results").glob("*.json"))
    assert {"engine.json", "family.json", "per_token.json", "pursuit.json", "downstream_ce.json"} <= set(
        results
    )
    for name in results:
        a = strip_volatile(json.loads((whole / "results" / name).read_text()))
        b = strip_volatile(json.loads((streamed / "results" / name).read_text()))
        if name == "downstream_ce.json":  # one clean pass more per extra group: a count, not a result
            assert b.pop("forward_passes") >= a.pop("forward_passes")
        assert not _diffs(a, b, name), _diffs(a, b, name)[:5]
    # the per-token table is float32: the probes agree to ~1e-12, so a value can round to a neighbour
    t_whole = pq.read_table(whole / "tables" / "tokens.parquet")
    t_streamed = pq.read_table(streamed / "tables" / "tokens.parquet")
    assert t_streamed.schema == t_whole.schema and t_streamed.num_rows == t_whole.num_rows
    for name in t_whole.column_names:
        a, b = t_whole[name].to_numpy(), t_streamed[name].to_numpy()
        if a.dtype.kind == "f":
            np.testing.assert_allclose(b, a, rtol=2.5e-7, atol=1e-12, err_msg=name)
        else:
            assert (a == b).all(), name
    tensors = [Path("engine/norm_grams.safetensors")] + [
        p.relative_to(whole) for p in (whole / "probes").glob("*.safetensors")
    ]
    assert len(tensors) == 4
    for rel in tensors:
        a, b = load_file(str(whole / rel)), load_file(str(streamed / rel))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-9, atol=1e-12, msg=f"{rel}:{k}")
