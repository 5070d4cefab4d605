"""Build ``OUT/report.html`` from the result files alone: no model, store or SAE is loaded."""

from __future__ import annotations

from pathlib import Path

from darkmatter import atomic
from darkmatter.claims import evaluate_claims, write_claims
from darkmatter.report import figures as fg
from darkmatter.report.drawings import draw_figures
from darkmatter.report.html import render
from darkmatter.results import Result, read_result
from darkmatter.study.steps import STEPS


def load_results(run_dir: str | Path) -> dict[str, Result]:
    """Every step's result found under ``run_dir/results``, typed, in study order."""
    found: dict[str, Result] = {}
    for step in STEPS:
        result = read_result(run_dir, step.name, step.result_type)
        if result is not None:
            found[step.name] = result
    return found


def write_report(
    run_dir: str | Path, *, redraw: bool = False, formats: tuple[str, ...] = ("png", "pdf"), dpi: int = fg.DPI
) -> Path:
    """Draw the figures from the results (all of them with ``redraw``, else those whose result, drawing
    code, ``formats`` or ``dpi`` changed), test the paper's claims on the results (``results/claims.json``)
    and write the self-contained report; returns its path."""
    run_dir = Path(run_dir)
    results = load_results(run_dir)
    with fg.formats(formats, dpi=dpi):
        figures = draw_figures(run_dir, results, redraw=redraw)
    claims = evaluate_claims(results)
    write_claims(run_dir, claims)
    path = run_dir / "report.html"
    atomic.write_text(path, render(run_dir, results, figures, claims))
    return path
