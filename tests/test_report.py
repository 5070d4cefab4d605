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


def _engine_run(run_dir: Path) -> list[str]:
    """An engine result over a scattered 60-SAE grid at the main site and two SAEs elsewhere."""
    import numpy as np

    from darkmatter.study.steps.engine import EngineResult, ProbeLatents, SAEErrorStats

    rng = np.random.default_rng(0)
    numbers = [
        "fvu",
        "nmse",
        "l0",
        "dead_fraction",
        "norm_ratio",
        "vector_r2",
        "vector_r2_weighted",
        "vector_r2_nobias",
        "fvu_nonlinear",
        "fvu_nonlinear_nobias",
        "fvu_nonlinear_pass2",
        "norm_r2",
        "norm_r2_plain",
        "norm_r2_nobias",
        "cos_linear_x",
        "ridge",
        "mean_error_norm",
        "mean_linear_norm",
        "mean_nonlinear_norm",
    ]

    def stats(name: str, site: str, width: int, l0: float) -> SAEErrorStats:
        values = {k: float(rng.uniform(0.1, 0.9)) for k in numbers}
        values["l0"] = l0
        return SAEErrorStats(
            name=name, site=site, d_sae=width, k=None, constant_dims=0, norm_test={"x": 0.9}, **values
        )

    main = "blocks.20.hook_resid_post"
    saes = [
        stats(f"w{e}-{i}", main, 2**e, float(rng.uniform(8, 400))) for e in range(14, 21) for i in range(9)
    ][:60]
    saes += [
        stats("prev", "blocks.19.hook_resid_post", 2**14, 60.0),
        stats("mlp", "blocks.20.hook_mlp_out", 2**14, 40.0),
    ]
    width_sweep = [f"w{e}-0" for e in range(14, 21)]
    result = EngineResult(
        experiment="engine",
        saes=saes,
        width_sweep=width_sweep,
        k_sweep=[s.name for s in saes if s.site == main],
        norm_quantities=["x"],
        probe_latents=ProbeLatents(
            sae=width_sweep[-1],
            probe_r2=0.9,
            correlation=0.8,
            correlation_mean=0.5,
            n_latents=3,
            probe_dot=[0.1, 0.2, 0.3],
            mean_active=[1.0, 2.0, 3.0],
        ),
        n_train=100,
        n_test=100,
    )
    write_result(run_dir, result)
    return [s.name for s in saes if s.site == main]


def test_fig2_maps_every_main_site_sae_in_four_panels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model: None
) -> None:
    main_site = _engine_run(tmp_path)
    seen: list[dict[str, Any]] = []
    original = fg.plot_error_prediction_maps

    def spy(widths: Any, l0s: Any, **kwargs: Any) -> Any:
        seen.append({"widths": list(widths), "l0s": list(l0s), **kwargs})
        return original(widths, l0s, **kwargs)

    monkeypatch.setattr(fg, "plot_error_prediction_maps", spy)
    write_report(tmp_path)
    (call,) = seen
    assert len(call["widths"]) == len(main_site) == 60
    assert {k for k in call if k not in ("widths", "l0s", "out_dir")} == {
        "fvu",
        "vector_r2",
        "norm_r2",
        "fvu_nonlinear",
    }
    assert all(len(call[k]) == 60 for k in ("fvu", "vector_r2", "norm_r2", "fvu_nonlinear"))
    assert (tmp_path / "figures" / "error_prediction_maps.png").is_file()
    html = (tmp_path / "report.html").read_text()
    assert "Fig 2 maps four quantities over SAE width × L0 for the 60 SAEs at the main site" in html
    assert 'alt="error prediction maps"' in html
