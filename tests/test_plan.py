"""The planner: every enabled step planned with positive numbers, SAE groups within the device budget, the
paper presets planned offline, a study over budget stopped before any work, the calibration cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from darkmatter.cli import main
from darkmatter.config import resolve_config
from darkmatter.study.plan import Calibration, plan_study
from darkmatter.study.plan import calibration as calmod
from darkmatter.study.steps import STEPS

CAL = Calibration(
    key="test",
    device="cpu:test",
    gemm_fp32=100e9,
    gemm_fp64=40e9,
    gemm_bf16=200e9,
    disk_write=500e6,
    disk_read=2e9,
    threads=2,
    torch_version=torch.__version__,
)


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh calibration cache (the model cache stays where it is)."""
    monkeypatch.setattr(calmod, "cache_path", lambda: tmp_path / "cache" / calmod.CACHE_FILE)


def _fixed_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calmod, "measure", lambda device, folder: CAL)


@pytest.mark.parametrize("preset", ["tiny", "demo"])
def test_every_enabled_step_has_positive_numbers(preset: str, tmp_path: Path) -> None:
    cfg = resolve_config(preset, None, [])
    plan = plan_study(cfg, tmp_path / "run", calibration=CAL)
    enabled = [s.name for s in STEPS if s.enabled(cfg)]
    assert [s.name for s in plan.steps] == enabled
    for s in plan.steps:
        assert s.tokens > 0 and s.seconds > 0 and s.passes > 0, s
        assert s.peak_host_bytes > 0 and s.peak_device_bytes > 0, s
        if s.name != "per_token":
            assert s.flops > 0, s
    assert plan.step("harvest").disk_bytes > 0 and plan.disk_bytes >= plan.step("harvest").disk_bytes
    assert plan.total_seconds == pytest.approx(sum(s.seconds for s in plan.steps))
    assert plan.peak_host_bytes == max(s.peak_host_bytes for s in plan.steps)
    assert plan.problems() == []
    assert plan.budget.host_bytes > 0


def test_groups_respect_a_small_device_budget(tmp_path: Path) -> None:
    fits = resolve_config("demo", None, [])
    small = resolve_config("demo", None, ["resources.device_memory_gb=1.6"])
    many = plan_study(small, tmp_path, calibration=CAL).step("engine")
    one = plan_study(fits, tmp_path, calibration=CAL).step("engine")
    assert len(one.groups) == 1
    assert len(many.groups) > 1 and many.passes == 2 * len(many.groups)
    assert sorted(n for g in many.groups for n in g) == sorted(n for g in one.groups for n in g)


@pytest.mark.parametrize(
    ("preset", "model", "widest"),
    [
        ("paper-gemma-2-9b", "42 layers, d 3584", "L20-res-1m"),
        ("gemma-scope-2-1b", "26 layers, d 1152, 1.00 B parameters", "L13-res-1m"),
    ],
)
def test_paper_preset_is_planned_offline(
    preset: str, model: str, widest: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fixed_calibration(monkeypatch := pytest.MonkeyPatch())
    try:
        code = main(["plan", "--preset", preset, "--out", str(tmp_path / "run")])
    finally:
        monkeypatch.undo()
    out = capsys.readouterr().out
    assert code == 0, out
    cfg = resolve_config(preset, None, [])
    for step in STEPS:
        if step.enabled(cfg):
            assert f"\n{step.name} " in out
    assert "planner's table" in out and "total" in out and "budget:" in out
    assert model in out and widest in out  # the table's dimensions; the groups
    assert not (tmp_path / "run").exists()


def test_run_over_budget_stops_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fixed_calibration(monkeypatch := pytest.MonkeyPatch())
    out = tmp_path / "run"
    try:
        code = main(["run", "--preset", "tiny", "--out", str(out), "--set", "resources.host_memory_gb=0.001"])
        plan_code = main(["plan", "--preset", "tiny", "--set", "resources.disk_gb=0.000001"])
    finally:
        monkeypatch.undo()
    captured = capsys.readouterr()
    assert code != 0 and plan_code != 0
    assert "resources.host_memory_gb" in captured.err and "Traceback" not in captured.err
    assert "resources.disk_gb" in captured.out
    assert not (out / "store").exists() and not (out / "results").exists()


def test_calibration_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = calmod.measure

    def counted(device: torch.device, folder: Path) -> Calibration:
        calls.append(1)
        return real(device, folder)

    monkeypatch.setattr(calmod, "GEMM_SECONDS", 0.02)
    monkeypatch.setattr(calmod, "DISK_BYTES", 4 * 1024**2)
    monkeypatch.setattr(calmod, "measure", counted)
    first = calmod.calibrate(torch.device("cpu"), tmp_path)
    second = calmod.calibrate(torch.device("cpu"), tmp_path)
    assert len(calls) == 1 and first == second
    assert first.gemm_fp32 > 0 and first.gemm_fp64 > 0 and first.disk_write > 0 and first.disk_read > 0
    assert calmod.cache_path().is_file()
    calmod.calibrate(torch.device("cpu"), tmp_path, recalibrate=True)
    assert len(calls) == 2
