"""One HTML section per result of a study, from the typed result and its figure files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from darkmatter.experiments.synthetic_summary import correlation_interval
from darkmatter.report.drawings import map_saes
from darkmatter.report.intervention_sections import (
    autointerp_section,
    downstream_section,
    earlier_section,
    error_saes_section,
    pursuit_section,
)
from darkmatter.report.markup import (
    JACKKNIFE_NOTE,
    Figures,
    ci,
    esc,
    fmt,
    grid,
    images,
    key_value_table,
    p,
    with_ci,
)
from darkmatter.study.steps.engine import EngineResult
from darkmatter.study.steps.family import FamilyResult
from darkmatter.study.steps.harvest import HarvestResult
from darkmatter.study.steps.layer_sweep import LayerBaselinesResult
from darkmatter.study.steps.per_token import PerTokenResult
from darkmatter.study.steps.synthetic import SyntheticStepResult

__all__ = ["SECTIONS", "Figures", "esc", "fmt", "key_value_table"]


def harvest_section(res: HarvestResult, figs: Figures, run_dir: Path) -> str:
    s = res.store
    rows: list[tuple[str, Any]] = [
        ("model", s.model),
        ("sites", ", ".join(s.sites)),
        ("contexts x length", f"{s.n_contexts} x {s.ctx_len} = {s.tokens} tokens"),
        ("skipped positions per context", s.skip_positions),
        ("storage dtype", s.dtype),
        ("store size", f"{s.bytes / 1e6:.1f} MB"),
    ]
    if res.tokens_per_second:
        rows.append(("harvest throughput", f"{res.tokens_per_second:.0f} tokens/s"))
    return "<h2>Activations</h2>" + key_value_table(rows)


def family_section(res: FamilyResult, figs: Figures, run_dir: Path) -> str:
    tol = res.converge_tol

    def converged(change: float | None, ok: bool | None) -> str:
        if change is None or ok is None or tol is None:
            return "—"
        moved = f"{abs(change):.1%}" if change >= 0 else f"rose {abs(change):.1%}"
        return f"yes ({moved})" if ok else f"no ({moved} > {100 * tol:g}%)"

    rows = [
        [
            esc(r.name),
            esc(r.site),
            str(r.d_sae),
            str(r.k),
            f"{r.fvu:.4f}",
            f"{r.l0:.1f}",
            f"{r.dead_fraction:.1%}",
            converged(r.val_fvu_change, r.converged),
        ]
        for r in res.saes
    ]
    notes = [f"Trained in {res.train_seconds:.0f} s."] if res.train_seconds else []
    measured = [r for r in res.saes if r.converged is not None and r.val_fvu_change is not None]
    if tol is not None and measured:
        notes.append(
            f"Converged: the FVU on {res.validation_tokens or 0:,} fixed held-out validation tokens changed "
            f"by at most {100 * tol:g}% (relative) over the last quarter of training before the learning "
            "rate decays (the decay itself lowers it by several percent, however long the run)."
        )
        missed = [r for r in measured if not r.converged]
        if missed:
            worst = max(missed, key=lambda r: abs(r.val_fvu_change or 0.0))
            notes.append(
                f"{len(missed)} of {len(measured)} SAEs miss it, by up to "
                f"{abs(worst.val_fvu_change or 0.0):.1%} ({esc(worst.name)}): their FVU would still move "
                "with more training."
            )
        else:
            notes.append(f"All {len(measured)} SAEs meet it.")
    note = " ".join(notes)
    return (
        "<h2>The SAE family</h2>"
        + p("Reconstruction quality on held-out (test-split) tokens. " + note)
        + grid(["SAE", "site", "latents", "k", "FVU", "L0", "dead", "converged"], rows)
    )


def error_prediction_section(res: EngineResult, figs: Figures, run_dir: Path) -> str:
    st = {s.name: s for s in res.saes}

    def stat(n: str, key: str, spec: str) -> str:
        return with_ci(getattr(st[n], key), st[n].intervals.get(key), spec)

    rows = [
        [
            esc(n),
            str(st[n].d_sae),
            f"{st[n].l0:.1f}",
            stat(n, "fvu", ".4f"),
            stat(n, "fvu_nonlinear", ".4f"),
            stat(n, "vector_r2", ".3f"),
            stat(n, "norm_r2", ".3f"),
            f"{st[n].cos_linear_x:.2f}",
            f"{st[n].norm_ratio:.3f}",
        ]
        for n in dict.fromkeys(res.width_sweep + res.k_sweep)
    ]
    header = [
        "SAE",
        "latents",
        "L0",
        "FVU",
        "FVU_nonlinear",
        "vector R²",
        "norm R²",
        "cos(b*x, x)",
        "‖Sae(x)‖/‖x‖",
    ]
    vec = [s.vector_r2 for s in res.saes]
    nrm = [s.norm_r2 for s in res.saes]
    text = (
        f"A linear map of x predicts {min(vec):.0%}–{max(vec):.0%} of the SAE error vector (R² averaged over "
        f'dimensions; paper: 15–72%, "about half") and {min(nrm):.0%}–{max(nrm):.0%} of its squared norm '
        "(paper: 70–95%). FVU_nonlinear is the FVU left after adding the linear prediction to Sae(x). "
        f"Brackets: {JACKKNIFE_NOTE}"
    )
    if res.power_law is not None:
        c, a, m = res.power_law.c, res.power_law.a, res.power_law.m
        text += (
            f" Over the width sweep FVU(W) ≈ {c.point:.3f} + {a.point:.3g}·W^−{m.point:.3f} "
            f"(95% bootstrap CI of c: {c.low:.3f}–{c.high:.3f}, of m: {m.low:.3f}–{m.high:.3f}); paper, "
            "Gemma 2 9B layer 20: "
            "0.186 + 2.708·W^−0.317."
        )
    if res.fvu_nonlinear_mean is not None and res.fvu_nonlinear_ci is not None:
        lo, hi = res.fvu_nonlinear_ci
        text += (
            f" Mean FVU_nonlinear over widths: {res.fvu_nonlinear_mean:.3f} (95% CI {lo:.3f}–{hi:.3f}; "
            "paper: ≈0.122, flat in width)."
        )
    mapped = map_saes(res)
    maps = (
        f"Fig 2 maps four quantities over SAE width × L0 for the {len(mapped)} SAEs at the main site: FVU, "
        "the vector probe's R², the norm probe's R² and FVU_nonlinear. Each is interpolated linearly "
        "between the SAEs (black dots; measured L0) and drawn as 15 filled contour levels on log-log axes, "
        "as in the paper; with fewer than 3 distinct widths or L0s the SAEs are drawn as coloured markers."
        if "maps" in figs
        else ""
    )
    return (
        "<h2>Predicting SAE error (Figs 1–3)</h2>"
        + p(text)
        + grid(header, rows)
        + (p(maps) if maps else "")
        + images(run_dir, figs, ["maps", "scaling"], "error prediction")
    )


def norm_prediction_section(res: EngineResult, figs: Figures, run_dir: Path) -> str:
    paper = {
        "x": "0.98–0.99",
        "sae": "0.93–0.99",
        "error": "0.85–0.96",
        "linear": "0.93–0.97",
        "nonlinear": "0.80–0.95",
    }
    rows = []
    widest = res.sae(res.width_sweep[-1]) if res.width_sweep else None
    for q in res.norm_quantities:
        vals = [s.norm_test[q] for s in res.saes]
        mark = "—" if widest is None else with_ci(widest.norm_test[q], widest.intervals.get(f"norm_test.{q}"))
        rows.append([esc(q), f"{min(vals):.3f}–{max(vals):.3f}", mark, paper.get(q, "")])
    text = (
        "How well x predicts the squared norm of each component. The paper finds the nonlinear error the "
        "least predictable, so it is not a sparse sum of linear features of x. The widest SAE's column "
        f"carries its {JACKKNIFE_NOTE}"
    )
    header = ["‖q‖² for q =", "R² here (over SAEs)", "widest SAE", "paper (typical)"]
    return (
        "<h2>Norm-prediction test (Fig 6)</h2>"
        + p(text)
        + grid(header, rows)
        + images(run_dir, figs, ["violins"], "norm prediction")
    )


def probe_section(res: EngineResult, figs: Figures, run_dir: Path) -> str:
    pl = res.probe_latents
    r = with_ci(pl.correlation, correlation_interval(pl.correlation, pl.n_latents), ".2f")
    text = (
        f"SAE {esc(pl.sae)}: a probe from Sae(x) − b_dec to its squared norm reaches held-out R² "
        f"{pl.probe_r2:.3f}; its dot product with each unit decoder direction correlates r = "
        f"{r} (95% Fisher z) "
        f"with E[w²]/E[w] of that latent when active, over {pl.n_latents} latents "
        "(the App. C.1 prediction; the paper shows the two lining up)."
    )
    return "<h2>Norm probe vs latent activations (Fig 14)</h2>" + p(text) + images(run_dir, figs, ["scatter"])


def per_token_section(res: PerTokenResult, figs: Figures, run_dir: Path) -> str:
    def cells(key: str) -> list[tuple[float, list[float] | None]]:
        bounds = res.intervals.get(key)
        return [
            (v, bounds[i][j] if bounds else None)
            for i, row in enumerate(getattr(res, key))
            for j, v in enumerate(row)
            if v is not None
        ]

    r2, gain, plain = cells("r2"), cells("nonlinear_gain"), cells("nonlinear_gain_plain")
    text = "Per-token error norms of larger SAEs are predicted from smaller SAEs' by one scalar (Eq. 13). "
    if r2:
        low, high = min(r2), max(r2)
        text += (
            f"Held-out R² ranges {with_ci(*low, '.2f')} to {with_ci(*high, '.2f')} (paper: ≥ 0.78, adjacent "
            "widths 0.95–0.97). "
        )
    if gain and plain:
        text += (
            "Adding the smaller SAE's nonlinear-error norm as a second regressor lowers the held-out "
            f"unexplained variance by {min(gain)[0]:+.1f}% to {with_ci(*max(gain), '+.1f')}% with squared "
            f"norms (as Eq. 13) and by {min(plain)[0]:+.1f}% to {with_ci(*max(plain), '+.1f')}% with plain "
            "norms (as the paper's code); paper: up to about 5–6.5%."
        )
    if res.intervals:
        text += f" Brackets: {JACKKNIFE_NOTE}"
    return "<h2>Per-token scaling (Figs 4, 5, 12, 16)</h2>" + p(text) + images(run_dir, figs, alt="per-token")


def layer_section(res: LayerBaselinesResult, figs: Figures, run_dir: Path) -> str:
    def cell(name: str, i: int) -> str:
        rows = res.intervals.get(name)
        return with_ci(res.r2[name][i], rows[i] if rows else None)

    header = ["layer", *[esc(k) for k in res.r2], "FVU"]
    rows = [[str(la), *[cell(k, i) for k in res.r2], f"{res.fvu[i]:.3f}"] for i, la in enumerate(res.layers)]
    text = (
        "R² of predicting each layer's SAE squared error norm (held out). Paper (Gemma 2 9B): activations "
        "0.61 at layer 0 then 0.88–0.95; token identity 0.98 at layer 0 falling to ≈0.22; L0 up to ≈0.87; "
        "activation norm 0.15–0.57; model loss ≈0."
    )
    if res.intervals:
        text += (
            f" Brackets: {JACKKNIFE_NOTE} Here {res.interval_blocks} blocks of whole shards of the layer "
            "store; every regression and the token-identity per-id means are refitted without the block."
        )
    notes = "".join(f"<li>{esc(n)}</li>" for n in res.notes)
    return (
        "<h2>Error-norm baselines across layers (Figs 3, 13)</h2>"
        + p(text)
        + grid(header, rows)
        + (f"<ul class='note'>{notes}</ul>" if notes else "")
        + images(run_dir, figs, alt="layers")
    )


def synthetic_section(res: SyntheticStepResult, figs: Figures, run_dir: Path) -> str:
    def cell(v: float | None, i: int = -1, j: int = -1) -> str:
        bounds = res.table1_intervals[i][j] if i >= 0 and res.table1_intervals else None
        return "—" if v is None else f"{v:.3f}" + ci(bounds)

    t, paper = res.table1, res.table1_paper
    labels = ["activation noise σ_act", "reconstruction noise σ_rec"]
    rows = [
        [labels[i], cell(t[i][0], i, 0), cell(t[i][1], i, 1), f"{cell(paper[i][0])} / {cell(paper[i][1])}"]
        for i in range(2)
    ]
    header = [
        "correlation over the 25 settings",
        "est. Dense (linear)",
        "est. Introduced (nonlinear)",
        "paper",
    ]
    text = (
        f"x′ = Sae(x) for {res.n_tokens} tokens of SAE {esc(res.sae_name)}, with Gaussian noise added to "
        "the input (Dense) and to the reconstruction (Introduced). The estimated linear error tracks the "
        "input noise and the estimated nonlinear error the reconstruction noise when the diagonal "
        f"dominates: {'yes' if res.diagonal_ok else 'no'}. Brackets: 95% Fisher-z intervals of each "
        "correlation over the grid's settings."
    )
    return (
        "<h2>Synthetic simulation (Table 1, Fig 15, App. D)</h2>"
        + p(text)
        + (grid(header, rows) if t else "")
        + images(run_dir, figs, alt="synthetic")
    )


Section = Callable[[Any, Figures, Path], str]
SECTIONS: list[tuple[str, Section]] = [
    ("harvest", harvest_section),
    ("family", family_section),
    ("engine", error_prediction_section),
    ("per_token", per_token_section),
    ("engine", norm_prediction_section),
    ("engine", probe_section),
    ("layer_sweep", layer_section),
    ("synthetic", synthetic_section),
    ("pursuit", pursuit_section),
    ("downstream_ce", downstream_section),
    ("earlier_layers", earlier_section),
    ("error_saes", error_saes_section),
    ("autointerp", autointerp_section),
]
"""The report's sections in order, each with the step whose result it shows."""
