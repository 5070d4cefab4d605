"""The figures stage: every figure of the report, drawn from the typed results alone.

``draw_figures`` draws each step's figures from its typed result into ``run_dir/figures``; no model,
store or SAE is needed, so ``darkmatter report`` redraws a changed figure without recomputing anything.
``darkmatter run`` keeps figures whose result and drawing code have not changed since they were drawn.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from darkmatter import atomic
from darkmatter.hashing import sha256_hex
from darkmatter.report import figures as fg
from darkmatter.study.steps.autointerp import AutoInterpStepResult
from darkmatter.study.steps.downstream_ce import DownstreamResult
from darkmatter.study.steps.earlier_layers import EarlierLayersStepResult
from darkmatter.study.steps.engine import EngineResult
from darkmatter.study.steps.error_saes import ErrorSAEsStepResult
from darkmatter.study.steps.layer_sweep import LayerBaselinesResult
from darkmatter.study.steps.per_token import PerTokenResult
from darkmatter.study.steps.pursuit import PursuitResult
from darkmatter.study.steps.synthetic import SyntheticStepResult

Files = dict[str, Path]
Drawn = dict[str, Files]
DECILE_LABELS = ["Not"] + [f"Q{i}" for i in range(1, 11)]


def _matrix(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def map_saes(res: EngineResult) -> list[str]:
    """Fig 2's SAEs: every SAE the engine measured at the main site (that of the width and k sweeps)."""
    swept = list(dict.fromkeys(res.width_sweep + res.k_sweep))
    if not swept:
        return []
    sites = {s.name: s.site for s in res.saes}
    main = {sites[n] for n in swept if n in sites}
    return list(dict.fromkeys([*swept, *(s.name for s in res.saes if s.site in main)]))


def engine_figures(res: EngineResult, figdir: Path) -> Drawn:
    """Fig 2's maps over width × L0, Fig 1's scaling decomposition, Fig 6's violins, Fig 14's scatter."""
    drawn: Drawn = {}
    st = {s.name: s for s in res.saes}
    grid = map_saes(res)
    if grid:
        drawn["maps"] = fg.plot_error_prediction_maps(
            [st[n].d_sae for n in grid],
            [st[n].l0 for n in grid],
            fvu=[st[n].fvu for n in grid],
            vector_r2=[st[n].vector_r2 for n in grid],
            norm_r2=[st[n].norm_r2 for n in grid],
            fvu_nonlinear=[st[n].fvu_nonlinear for n in grid],
            out_dir=figdir,
        )
    if res.width_sweep and res.fvu_nonlinear_mean is not None:
        law = res.power_law
        fit = {k: getattr(law, k).point for k in ("c", "a", "m")} if law else None
        fit_ci = (
            {k: {"low": getattr(law, k).low, "high": getattr(law, k).high} for k in "cam"} if law else None
        )
        ws = res.width_sweep
        drawn["scaling"] = fg.plot_scaling_decomposition(
            [st[n].d_sae for n in ws],
            [st[n].fvu for n in ws],
            [st[n].fvu_nonlinear for n in ws],
            fit,
            fit_ci,
            res.fvu_nonlinear_mean,
            figdir,
        )
    quantities = res.norm_quantities
    drawn["violins"] = fg.plot_norm_prediction_violins(
        quantities, {q: [s.norm_test[q] for s in res.saes] for q in quantities}, figdir
    )
    pl = res.probe_latents
    drawn["scatter"] = fg.plot_probe_vs_latents(pl.probe_dot, pl.mean_active, figdir, corr=pl.correlation)
    return drawn


def per_token_figures(res: PerTokenResult, figdir: Path) -> Drawn:
    """Fig 4 (R² between widths), App. E (nonlinear gain), Fig 5 (token trace), Fig 12 (norm violins)."""
    drawn: Drawn = {}
    if len(res.names) >= 2:
        labels = [str(w) for w in res.widths]
        drawn["r2"] = fg.plot_per_token_matrix(
            labels,
            _matrix(res.r2),
            figdir,
            stem="per_token_r2",
            title="R² of predicting the larger SAE's per-token ‖e‖²",
        )
        drawn["gain"] = fg.plot_per_token_matrix(
            labels,
            _matrix(res.nonlinear_gain),
            figdir,
            stem="per_token_nonlinear_gain",
            title="% less unexplained variance with ‖NonlinearError‖² added",
            cmap_label="%",
        )
    if res.trace is not None:
        norms = res.trace.error_norm
        series = {f"{w} latents": norms[n] for n, w in zip(res.names, res.widths, strict=True)}
        drawn["trace"] = fg.plot_token_trace(res.trace.tokens, series, figdir)
    if res.norm_samples is not None:
        samples = res.norm_samples
        drawn["norms"] = fg.plot_linear_vs_nonlinear_norms(
            res.widths, samples.linear, samples.nonlinear, figdir
        )
    return drawn


def layer_figures(res: LayerBaselinesResult, figdir: Path) -> Drawn:
    return {"lines": fg.plot_layer_baselines(res.layers, res.r2, figdir)}


def synthetic_figures(res: SyntheticStepResult, figdir: Path) -> Drawn:
    """Fig 15: FVU of the SAE and of SAE + error prediction against the ablated fraction."""
    curves: dict[str, list[float]] = {}
    ablation: list[float] = []
    for c in res.curves:
        label = f"σ_act={c.sigma_act:g}, σ_rec={c.sigma_rec:g}"
        ablation = c.ablation
        curves[f"{label}: SAE"] = c.fvu_rec
        curves[f"{label}: SAE + error prediction"] = c.fvu_lin
    return {"curves": fg.plot_synthetic_simulation(ablation, curves, figdir)} if curves else {}


def pursuit_figures(res: PursuitResult, figdir: Path) -> Drawn:
    """Fig 1 with gradient pursuit's FVU and FVU_nonlinear beside the SAEs'."""
    if not res.saes:
        return {}
    rows = res.saes
    return {
        "scaling": fg.plot_scaling_decomposition(
            [r.d_sae for r in rows],
            [r.fvu for r in rows],
            [r.fvu_nonlinear for r in rows],
            None,
            None,
            float(np.mean([r.fvu_nonlinear for r in rows])),
            figdir,
            stem="scaling_pursuit",
            pursuit_fvu=[r.pursuit_fvu for r in rows],
            pursuit_nonlinear=[r.pursuit_fvu_nonlinear for r in rows],
        )
    }


def downstream_figures(res: DownstreamResult, figdir: Path) -> Drawn:
    """Figs 8/9: CE recovered by each component, next to its variance and norm shares."""
    rows = list(res.saes.values())

    def pct(values: list[float | None]) -> list[float]:
        return [100 * (v or 0) for v in values]

    return {
        "bars": fg.plot_ce_recovered(
            [str(r.d_sae) for r in rows],
            pct([r.ce_recovered_linear for r in rows]),
            pct([r.ce_recovered_nonlinear for r in rows]),
            pct([r.variance_share_linear for r in rows]),
            pct([r.variance_share_nonlinear for r in rows]),
            pct([r.norm_share_linear for r in rows]),
            pct([r.norm_share_nonlinear for r in rows]),
            figdir,
        )
    }


def earlier_figures(res: EarlierLayersStepResult, figdir: Path) -> Drawn:
    """Figs 9b/10b: R² of each error component from each earlier SAE's reconstruction."""
    el = res.predictors
    if el is None:
        return {}
    r2 = {t: [el.r2[r][t] for r in el.regressors] for t in el.targets}
    return {"bars": fg.plot_earlier_layer_r2(el.regressors, r2, figdir)}


def error_sae_figures(res: ErrorSAEsStepResult, figdir: Path) -> Drawn:
    """Fig 7: training curves of the SAEs on the error components."""
    curves = {f"SAE on {c} error": [(h.step, h.fvu) for h in res.curves.get(c, [])] for c in res.components}
    return {"curves": fg.plot_training_curves(curves, figdir, stem="error_sae_curves")}


def autointerp_figures(res: AutoInterpStepResult, figdir: Path) -> Drawn:
    """Fig 8: detection accuracy per activation decile, linear vs nonlinear error SAE."""
    if res.error or not {"linear", "nonlinear"} <= set(res.components):
        return {}
    acc: dict[str, list[float]] = {}
    ci: dict[str, list[tuple[float, float]]] = {}
    for c in ("linear", "nonlinear"):
        summary = res.components[c].summary
        props = [summary.negatives, *summary.deciles]
        acc[c] = [np.nan if p.accuracy is None else p.accuracy for p in props]
        ci[c] = [
            (np.nan, np.nan) if p.ci_low is None or p.ci_high is None else (p.ci_low, p.ci_high)
            for p in props
        ]
    return {
        "detection": fg.plot_detection_accuracy(
            DECILE_LABELS, acc["linear"], acc["nonlinear"], ci["linear"], ci["nonlinear"], figdir
        )
    }


DRAWERS: dict[str, Callable[[Any, Path], Drawn]] = {
    "engine": engine_figures,
    "per_token": per_token_figures,
    "layer_sweep": layer_figures,
    "synthetic": synthetic_figures,
    "pursuit": pursuit_figures,
    "downstream_ce": downstream_figures,
    "earlier_layers": earlier_figures,
    "error_saes": error_sae_figures,
    "autointerp": autointerp_figures,
}
"""Step name -> the function drawing its result's figures."""


STAMPS = ".drawn.json"
"""In ``figures/``: per step, the fingerprint its figures were drawn from and the files drawn."""


@functools.cache
def drawing_code_digest() -> str:
    """Hash of the code that draws figures: a change to any figure function redraws every figure."""
    folder = Path(fg.__file__).parent
    sources = [*sorted(folder.glob("*.py")), Path(__file__)]
    return sha256_hex(b"".join(p.read_bytes() for p in sources))[:16]


def draw_figures(
    run_dir: Path, results: dict[str, Any], *, redraw: bool = False
) -> dict[str, dict[str, dict[str, str]]]:
    """Draw the figures of ``results`` (step name -> typed result) into ``run_dir/figures``.

    Figures whose result file and drawing code are unchanged since they were drawn are kept, unless
    ``redraw``. Returns, per step, figure name -> {"png": path, "pdf": path} relative to ``run_dir``.
    """
    run_dir = Path(run_dir)
    figdir = run_dir / "figures"
    root = run_dir.resolve()
    stamps_path = figdir / STAMPS
    try:
        stamps: dict[str, Any] = json.loads(stamps_path.read_text()) if stamps_path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        stamps = {}
    drawn: dict[str, dict[str, dict[str, str]]] = {}
    for name, result in results.items():
        if name not in DRAWERS:
            continue
        fingerprint = _fingerprint(run_dir, name)
        old = stamps.get(name, {})
        if not redraw and old.get("fingerprint") == fingerprint and _all_exist(run_dir, old.get("files", {})):
            drawn[name] = old["files"]
            continue
        files = DRAWERS[name](result, figdir)
        drawn[name] = {
            fig: {ext: str(Path(p).resolve().relative_to(root)) for ext, p in paths.items()}
            for fig, paths in files.items()
        }
        stamps[name] = {"fingerprint": fingerprint, "files": drawn[name]}
    if drawn:
        atomic.write_json(stamps_path, stamps)
    return drawn


def _fingerprint(run_dir: Path, name: str) -> str:
    result_file = run_dir / "results" / f"{name}.json"
    kinds = ",".join(fg.style.FORMATS.get()) + f"@{fg.style.PNG_DPI.get()}"
    return f"{sha256_hex(result_file.read_bytes())[:16]}:{drawing_code_digest()}:{kinds}"


def _all_exist(run_dir: Path, files: dict[str, dict[str, str]]) -> bool:
    return all((run_dir / rel).is_file() for paths in files.values() for rel in paths.values())
