"""One HTML section per result of a study, from the typed result and its figure files."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from darkmatter.study.steps.autointerp import AutoInterpStepResult
from darkmatter.study.steps.downstream_ce import DownstreamResult
from darkmatter.study.steps.earlier_layers import EarlierLayersStepResult
from darkmatter.study.steps.engine import EngineResult
from darkmatter.study.steps.error_saes import ErrorSAEsStepResult
from darkmatter.study.steps.family import FamilyResult
from darkmatter.study.steps.harvest import HarvestResult
from darkmatter.study.steps.layer_sweep import LayerBaselinesResult
from darkmatter.study.steps.per_token import PerTokenResult
from darkmatter.study.steps.pursuit import PursuitResult
from darkmatter.study.steps.synthetic import SyntheticStepResult

Figures = dict[str, dict[str, str]]  # figure name -> {"png": path relative to the run, "pdf": ...}

esc = html.escape


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return esc(json.dumps(v))
    return esc(str(v))


def key_value_table(rows: Iterable[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{fmt(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def grid(header: list[str], rows: Iterable[list[str]]) -> str:
    """A table from a header and rows of cells that are already HTML."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def p(text: str) -> str:
    return f"<p>{text}</p>"


def images(run_dir: Path, figs: Figures, names: Iterable[str] | None = None, alt: str = "") -> str:
    """The PNGs of ``figs`` (or of ``names`` among them), embedded as data URIs."""
    parts = []
    for name in names if names is not None else figs:
        png = figs.get(name, {}).get("png")
        if png and (run_dir / png).is_file():
            data = base64.b64encode((run_dir / png).read_bytes()).decode()
            parts.append(
                f'<figure><img alt="{esc(f"{alt} {name}")}" src="data:image/png;base64,{data}"></figure>'
            )
    return "".join(parts)


def pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.0f}%"


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
    rows = [
        [
            esc(r.name),
            esc(r.site),
            str(r.d_sae),
            str(r.k),
            f"{r.fvu:.4f}",
            f"{r.l0:.1f}",
            f"{r.dead_fraction:.1%}",
        ]
        for r in res.saes
    ]
    note = f"Trained in {res.train_seconds:.0f} s." if res.train_seconds else ""
    return (
        "<h2>The SAE family</h2>"
        + p("Reconstruction quality on held-out (test-split) tokens. " + note)
        + grid(["SAE", "site", "latents", "k", "FVU", "L0", "dead"], rows)
    )


def error_prediction_section(res: EngineResult, figs: Figures, run_dir: Path) -> str:
    st = {s.name: s for s in res.saes}
    rows = [
        [
            esc(n),
            str(st[n].d_sae),
            f"{st[n].l0:.1f}",
            f"{st[n].fvu:.4f}",
            f"{st[n].fvu_nonlinear:.4f}",
            f"{st[n].vector_r2:.3f}",
            f"{st[n].norm_r2:.3f}",
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
        "(paper: 70–95%). FVU_nonlinear is the FVU left after adding the linear prediction to Sae(x)."
    )
    if res.power_law is not None:
        c, a, m = res.power_law.c, res.power_law.a, res.power_law.m
        text += (
            f" Over the width sweep FVU(W) ≈ {c.point:.3f} + {a.point:.3g}·W^−{m.point:.3f} "
            f"(95% bootstrap CI of c: {c.low:.3f}–{c.high:.3f}); paper, Gemma 2 9B layer 20: "
            "0.186 + 2.708·W^−0.317."
        )
    if res.fvu_nonlinear_mean is not None and res.fvu_nonlinear_ci is not None:
        lo, hi = res.fvu_nonlinear_ci
        text += (
            f" Mean FVU_nonlinear over widths: {res.fvu_nonlinear_mean:.3f} (CI {lo:.3f}–{hi:.3f}; "
            "paper: ≈0.122, flat in width)."
        )
    return (
        "<h2>Predicting SAE error (Figs 1–3)</h2>"
        + p(text)
        + grid(header, rows)
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
    for q in res.norm_quantities:
        vals = [s.norm_test[q] for s in res.saes]
        rows.append([esc(q), f"{min(vals):.3f}–{max(vals):.3f}", paper.get(q, "")])
    text = (
        "How well x predicts the squared norm of each component. The paper finds the nonlinear error the "
        "least predictable, so it is not a sparse sum of linear features of x."
    )
    return (
        "<h2>Norm-prediction test (Fig 6)</h2>"
        + p(text)
        + grid(["‖q‖² for q =", "R² here (over SAEs)", "paper (typical)"], rows)
        + images(run_dir, figs, ["violins"], "norm prediction")
    )


def probe_section(res: EngineResult, figs: Figures, run_dir: Path) -> str:
    pl = res.probe_latents
    text = (
        f"SAE {esc(pl.sae)}: a probe from Sae(x) − b_dec to its squared norm reaches held-out R² "
        f"{pl.probe_r2:.3f}; its dot product with each unit decoder direction correlates r = "
        f"{pl.correlation:.2f} with E[w²]/E[w] of that latent when active, over {pl.n_latents} latents "
        "(the App. C.1 prediction; the paper shows the two lining up)."
    )
    return "<h2>Norm probe vs latent activations (Fig 14)</h2>" + p(text) + images(run_dir, figs, ["scatter"])


def per_token_section(res: PerTokenResult, figs: Figures, run_dir: Path) -> str:
    r2 = [v for row in res.r2 for v in row if v is not None]
    gain = [v for row in res.nonlinear_gain for v in row if v is not None]
    plain = [v for row in res.nonlinear_gain_plain for v in row if v is not None]
    text = "Per-token error norms of larger SAEs are predicted from smaller SAEs' by one scalar (Eq. 13). "
    if r2:
        text += f"Held-out R² ranges {min(r2):.2f}–{max(r2):.2f} (paper: ≥ 0.78, adjacent widths 0.95–0.97). "
    if gain and plain:
        text += (
            "Adding the smaller SAE's nonlinear-error norm as a second regressor lowers the held-out "
            f"unexplained variance by {min(gain):+.1f}% to {max(gain):+.1f}% with squared norms (as Eq. 13) "
            f"and by {min(plain):+.1f}% to {max(plain):+.1f}% with plain norms (as the paper's code); "
            "paper: up to about 5–6.5%."
        )
    return "<h2>Per-token scaling (Figs 4, 5, 12, 16)</h2>" + p(text) + images(run_dir, figs, alt="per-token")


def layer_section(res: LayerBaselinesResult, figs: Figures, run_dir: Path) -> str:
    header = ["layer", *[esc(k) for k in res.r2], "FVU"]
    rows = [
        [str(la), *[f"{res.r2[k][i]:.3f}" for k in res.r2], f"{res.fvu[i]:.3f}"]
        for i, la in enumerate(res.layers)
    ]
    text = (
        "R² of predicting each layer's SAE squared error norm (held out). Paper (Gemma 2 9B): activations "
        "0.61 at layer 0 then 0.88–0.95; token identity 0.98 at layer 0 falling to ≈0.22; L0 up to ≈0.87; "
        "activation norm 0.15–0.57; model loss ≈0."
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
    def cell(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    t, paper = res.table1, res.table1_paper
    labels = ["activation noise σ_act", "reconstruction noise σ_rec"]
    rows = [
        [labels[i], cell(t[i][0]), cell(t[i][1]), f"{cell(paper[i][0])} / {cell(paper[i][1])}"]
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
        f"dominates: {'yes' if res.diagonal_ok else 'no'}."
    )
    return (
        "<h2>Synthetic simulation (Table 1, Fig 15, App. D)</h2>"
        + p(text)
        + (grid(header, rows) if t else "")
        + images(run_dir, figs, alt="synthetic")
    )


def pursuit_section(res: PursuitResult, figs: Figures, run_dir: Path) -> str:
    header = ["SAE", "FVU", "pursuit FVU", "FVU_nonlinear", "pursuit FVU_nonlinear", "encoder error"]
    rows = [
        [
            esc(r.name),
            f"{r.fvu:.4f}",
            f"{r.pursuit_fvu:.4f}",
            f"{r.fvu_nonlinear:.4f}",
            f"{r.pursuit_fvu_nonlinear:.4f}",
            f"{r.encoder_error:.4f}",
        ]
        for r in res.saes
    ]
    text = (
        "Gradient pursuit over each SAE's decoder with each token's own L0 as budget, on "
        f"{res.n_contexts} contexts. FVU_nonlinear uses the engine's probe (fitted on the whole train "
        "split); the encoder error is the difference of two probes refitted on these contexts, the SAE's "
        "and its pursuit's, so their overfitting cancels. The paper finds pursuit lowers total FVU by 3–5% "
        'but barely moves FVU_nonlinear (0.122 → ≈0.117): a thin "encoder error" band.'
    )
    return "<h2>Gradient pursuit (Figs 1, 10a)</h2>" + p(text) + grid(header, rows) + images(run_dir, figs)


def downstream_section(res: DownstreamResult, figs: Figures, run_dir: Path) -> str:
    header = [
        "SAE",
        "CE clean → Sae(x)",
        "CE recovered: linear / nonlinear",
        "variance share",
        "norm share",
        "CE loss score",
    ]
    rows = [
        [
            esc(n),
            f"{res.clean_ce:.3f} → {r.ce['sae']:.3f}",
            f"{pct(r.ce_recovered_linear)} / {pct(r.ce_recovered_nonlinear)}",
            f"{pct(r.variance_share_linear)} / {pct(r.variance_share_nonlinear)}",
            f"{pct(r.norm_share_linear)} / {pct(r.norm_share_nonlinear)}",
            pct(r.ce_loss_score),
        ]
        for n, r in res.saes.items()
    ]
    text = (
        f"Splicing Sae(x) plus one error component at positions ≥ {res.start} of {res.n_contexts} held-out "
        "contexts (never harvested). CE recovered = (L_sae − L_component)/(L_sae − L_clean). Paper (Gemma 2 "
        "9B): both components recover CE roughly in proportion to their size, linear slightly more, summing "
        "past 100%. Splicing Sae(x) + both components reproduces the clean CE (checked on every run)."
    )
    return (
        "<h2>Downstream cross-entropy (Figs 8, 9)</h2>" + p(text) + grid(header, rows) + images(run_dir, figs)
    )


def _paper_key(name: str) -> str:
    if name == "self":
        return "residual"
    for part, key in ((".mlp", "MLP"), (".attn", "attention"), (".resid", "prev residual")):
        if part in name:
            return key
    return name


def earlier_section(res: EarlierLayersStepResult, figs: Figures, run_dir: Path) -> str:
    title = "<h2>Earlier-layer predictors (Figs 9b, 10b)</h2>"
    el = res.predictors
    if el is None:
        return title + p(esc("; ".join(res.notes)))
    targets = ("nonlinear", "error", "linear")
    paper = {r: el.paper_r2[_paper_key(r)] for r in el.regressors if _paper_key(r) in el.paper_r2}
    rows = [
        [
            esc(r),
            *[f"{el.r2[r][t]:.3f}" for t in targets],
            " / ".join(f"{paper[r][t]:.2f}" for t in targets) if r in paper else "",
        ]
        for r in el.regressors
    ]
    text = (
        f"R² (mean over dimensions, held out) of the error components of {esc(res.target)} regressed on "
        "other SAEs' reconstructions; 'joint' uses all of them (beyond the paper). With the joint map FVU "
        f"goes from {el.fvu_sae:.3f} (Sae(x)) to {el.fvu_with.get('joint', float('nan')):.3f}."
    )
    if res.mlp_probe is not None:
        text += (
            " An MLP probe on top of the linear probe explains "
            f"{res.mlp_probe.r2_nonlinear_mean_over_dims:.1%} of the nonlinear error (mean-over-dims R²)."
        )
    header = ["regressor", "NonlinearError", "SaeError", "LinearError", "paper"]
    return title + p(text) + grid(header, rows) + images(run_dir, figs)


def error_saes_section(res: ErrorSAEsStepResult, figs: Figures, run_dir: Path) -> str:
    rows = [
        [
            f"{esc(c)} error",
            f"{q.fvu:.3f}",
            f"{q.l0:.1f}",
            f"{q.dead_fraction:.1%}",
            f"{res.variance_ratio.get(c, float('nan')):.3f}",
        ]
        for c, q in res.saes.items()
    ]
    text = (
        f"TopK SAEs of equal width and k trained on the error components of {esc(res.sae_name)}, computed "
        "on the fly from the store with the engine's probe b*. FVU is relative to each component's own "
        "variance. "
        "Paper (Gemma 2 9B L20, width 16k, about 100M tokens each): final FVU ≈ 0.59 on NonlinearError vs "
        "≈ 0.54 on LinearError, the nonlinear error being the harder one."
    )
    header = ["trained on", "held-out FVU", "L0", "dead", "variance / Var(x)"]
    return (
        "<h2>SAEs trained on the error components (Figs 7, 8)</h2>"
        + p(text)
        + grid(header, rows)
        + images(run_dir, figs)
    )


def _accuracy(prop: Any) -> str:
    if prop.accuracy is None:
        return "—"
    return f"{prop.accuracy:.2f} [{prop.ci_low:.2f}, {prop.ci_high:.2f}]"


def autointerp_section(res: AutoInterpStepResult, figs: Figures, run_dir: Path) -> str:
    rows = []
    weak, judge, constrained = False, "", False
    for c, r in res.components.items():
        s = r.summary
        weak = weak or r.weak_judge
        judge = str(r.judge.get("model", judge))
        constrained = constrained or bool(r.judge.get("constrained"))
        bal = (
            "—"
            if s.balanced_accuracy is None
            else f"{s.balanced_accuracy:.2f} [{s.balanced_ci_low:.2f}, {s.balanced_ci_high:.2f}]"
        )
        rows.append(
            [
                f"{esc(c)} error",
                str(s.n_latents),
                str(len(r.skipped)),
                _accuracy(s.deciles[-1]),
                _accuracy(s.deciles[0]),
                _accuracy(s.negatives),
                bal,
                str(s.counts.failed_items),
            ]
        )
    text = (
        "Explanations from each latent's top-activating windows, then a detection test: the judge marks "
        "which unhighlighted windows (sampled per activation decile, plus windows where the latent never "
        "fires) match the explanation. Accuracies are pooled over latents with Wilson 95% intervals. Paper "
        "(Llama 3.1 70B as judge, 1000 latents per SAE): the SAE on the linear error is about 5 points more "
        "interpretable in every decile, e.g. Q10 0.70 vs 0.66, Q1 0.395 vs 0.365, negatives 0.77 vs 0.75."
    )
    if weak:
        how = (
            "its detection answers are decoded under a constraint (0 or 1 per example), so they always "
            "parse, but its explanations are crude"
            if constrained
            else "it often fails to answer in the required format (counted as unparsed)"
        )
        text += (
            f" <b>The judge here ({esc(judge)}) is a small model: {how}; its scores are a smoke test of the "
            "pipeline, not a measurement. Point error_saes.interp at a strong model through an "
            "OpenAI-compatible endpoint for real numbers.</b>"
        )
    if res.error:
        text += f" <b>Stopped early: {esc(res.error)}</b>"
    header = [
        "SAE on",
        "latents scored",
        "skipped",
        "Q10 (top decile)",
        "Q1",
        "not (TNR)",
        "balanced",
        "unparsed items",
    ]
    return (
        "<h2>Auto-interpretability of the error SAEs (Fig 8)</h2>"
        + p(text)
        + grid(header, rows)
        + images(run_dir, figs)
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
