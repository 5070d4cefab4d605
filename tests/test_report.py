"""The report is built from result files alone; figures are redrawn from results, never recomputed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from darkmatter.cli import main
from darkmatter.report import figures as fg
from darkmatter.report.build import write_report
from darkmatter.results import write_result
from darkmatter.study.steps.pursuit import PursuitResult, PursuitRow


def _pursuit_run(run_dir: Path, shift: float = 0.0) -> None:
    rows = [
        PursuitRow(
            name=f"w{w}",
            d_sae=w,
            fvu=0.3 - 0.02 * i + shift,
            fvu_nonlinear=0.1,
            pursuit_fvu=0.25 - 0.02 * i,
            pursuit_fvu_nonlinear=0.09,
            pursuit_l0=30.0,
            encoder_error=0.01,
            refit_fvu_nonlinear=0.105,
            refit_pursuit_fvu_nonlinear=0.095,
        )
        for i, w in enumerate((512, 1024, 2048))
    ]
    write_result(run_dir, PursuitResult(experiment="pursuit", saes=rows, n_contexts=2, n_test=100))


@pytest.fixture()
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a model or opening a store fails the test: the report must not need either."""

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("the report tried to load a model or a store")

    monkeypatch.setattr("darkmatter.lm.loading.load_lm", refuse)
    monkeypatch.setattr("darkmatter.store.ActivationStore.open", refuse)


def test_report_redraws_an_edited_figure_without_recomputing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model: None
) -> None:
    _pursuit_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    png = tmp_path / "figures" / "scaling_pursuit.png"
    result_file = tmp_path / "results" / "pursuit.json"
    figure_before, result_before = png.read_bytes(), result_file.read_bytes()
    assert "Gradient pursuit" in (tmp_path / "report.html").read_text()

    original = fg.plot_scaling_decomposition

    def edited(widths: Any, fvu: Any, *args: Any, **kwargs: Any) -> Any:  # an edit that moves the points
        return original(widths, [v / 2 for v in fvu], *args, **kwargs)

    monkeypatch.setattr(fg, "plot_scaling_decomposition", edited)
    assert main(["report", str(tmp_path)]) == 0
    assert png.read_bytes() != figure_before
    assert result_file.read_bytes() == result_before


def test_unchanged_figures_are_kept_and_a_changed_result_redraws(tmp_path: Path, no_model: None) -> None:
    _pursuit_run(tmp_path)
    write_report(tmp_path)
    png = tmp_path / "figures" / "scaling_pursuit.png"
    stamp = png.stat().st_mtime_ns
    write_report(tmp_path)
    assert png.stat().st_mtime_ns == stamp  # same result, same drawing code: kept
    _pursuit_run(tmp_path, shift=0.05)
    write_report(tmp_path)
    assert png.stat().st_mtime_ns != stamp
    png.unlink()
    write_report(tmp_path)  # a deleted figure is drawn again
    assert png.is_file()


def test_report_of_a_folder_without_results_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "run 'darkmatter run" in capsys.readouterr().err
