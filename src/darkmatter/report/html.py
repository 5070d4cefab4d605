"""Self-contained HTML report built from result files only (figures embedded as data URIs)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from darkmatter import __version__
from darkmatter.results import read_all_results
from darkmatter.store import atomic_write_bytes

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2rem auto;
padding:0 1rem;color:#1d232a;line-height:1.45}
h1{font-size:1.7rem}
h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0}
td,th{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:left}
th{background:#f6f8fa}figure{margin:1rem 0}img{max-width:100%;height:auto}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.8rem}.note{color:#57606a}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return html.escape(json.dumps(v))
    return html.escape(str(v))


def table(rows: list[tuple[str, Any]], header: tuple[str, str] | None = None) -> str:
    head = f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>" if header else ""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<table>{head}{body}</table>"


def embed_png(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _harvest_section(res: dict[str, Any]) -> str:
    s = res["store"]
    rows = [
        ("model", s["model"]),
        ("sites", ", ".join(s["sites"])),
        ("contexts x length", f"{s['n_contexts']} x {s['ctx_len']} = {s['tokens']} tokens"),
        ("skipped positions per context", s["skip_positions"]),
        ("storage dtype", s["dtype"]),
        ("store size", f"{s['bytes'] / 1e6:.1f} MB"),
    ]
    if res.get("tokens_per_second"):
        rows.append(("harvest throughput", f"{res['tokens_per_second']:.0f} tokens/s"))
    return "<h2>Activations</h2>" + table(rows)


def _figures(out: Path, res: dict[str, Any]) -> str:
    parts = []
    for name, files in res.get("figures", {}).items():
        png = files.get("png") if isinstance(files, dict) else None
        if png and (out / png).is_file():
            parts.append(embed_png(out / png, f"{res['experiment']} {name}"))
    return "".join(parts)


def _p(text: str) -> str:
    return f"<p>{text}</p>"


def _family_section(out: Path, res: dict[str, Any]) -> str:
    head = "<tr><th>SAE</th><th>site</th><th>latents</th><th>k</th><th>FVU</th><th>L0</th><th>dead</th></tr>"
    rows = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{html.escape(r['site'])}</td><td>{r['d_sae']}</td>"
        f"<td>{r['k']}</td><td>{r['fvu']:.4f}</td><td>{r['l0']:.1f}</td><td>{r['dead_fraction']:.1%}</td></tr>"
        for r in res["saes"]
    )
    note = f"Trained in {res['train_seconds']:.0f} s." if res.get("train_seconds") else ""
    return (
        "<h2>The SAE family</h2>"
        + _p("Reconstruction quality on held-out (test-split) tokens. " + note)
        + f"<table>{head}{rows}</table>"
    )


def _error_prediction_section(out: Path, res: dict[str, Any]) -> str:
    saes = {r["name"]: r for r in res["saes"]}
    ws = res["width_sweep"]
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{saes[n]['d_sae']}</td><td>{saes[n]['l0']:.1f}</td>"
        f"<td>{saes[n]['fvu']:.4f}</td><td>{saes[n]['fvu_nonlinear']:.4f}</td><td>{saes[n]['vector_r2']:.3f}</td>"
        f"<td>{saes[n]['norm_r2']:.3f}</td><td>{saes[n]['cos_linear_x']:.2f}</td><td>{saes[n]['norm_ratio']:.3f}</td></tr>"
        for n in dict.fromkeys(ws + res["k_sweep"])
    )
    head = (
        "<tr><th>SAE</th><th>latents</th><th>L0</th><th>FVU</th><th>FVU_nonlinear</th><th>vector R²</th>"
        "<th>norm R²</th><th>cos(b*x, x)</th><th>‖Sae(x)‖/‖x‖</th></tr>"
    )
    vec = [saes[n]["vector_r2"] for n in saes]
    nrm = [saes[n]["norm_r2"] for n in saes]
    text = (
        f"A linear map of x predicts {min(vec):.0%}–{max(vec):.0%} of the SAE error vector (R² averaged over "
        f'dimensions; paper: 15–72%, "about half") and {min(nrm):.0%}–{max(nrm):.0%} of its squared norm '
        "(paper: 70–95%). FVU_nonlinear is the FVU left after adding the linear prediction to Sae(x)."
    )
    law = res.get("power_law")
    if law:
        c, a, m = (law[k] for k in ("c", "a", "m"))
        text += (
            f" Over the width sweep FVU(W) ≈ {c['point']:.3f} + {a['point']:.3g}·W^−{m['point']:.3f} "
            f"(95% bootstrap CI of c: {c['low']:.3f}–{c['high']:.3f}); paper, Gemma 2 9B layer 20: "
            "0.186 + 2.708·W^−0.317."
        )
    if res.get("fvu_nonlinear_mean") is not None:
        lo, hi = res["fvu_nonlinear_ci"]
        text += (
            f" Mean FVU_nonlinear over widths: {res['fvu_nonlinear_mean']:.3f} (CI {lo:.3f}–{hi:.3f}; "
            "paper: ≈0.122, flat in width)."
        )
    return (
        "<h2>Predicting SAE error (Figs 1–3)</h2>"
        + _p(text)
        + f"<table>{head}{rows}</table>"
        + _figures(out, res)
    )


def _per_token_section(out: Path, res: dict[str, Any]) -> str:
    r2 = [v for row in res["r2"] for v in row if v is not None]
    gain = [v for row in res["nonlinear_gain"] for v in row if v is not None]
    text = "Per-token error norms of larger SAEs are predicted from smaller SAEs' by one scalar (Eq. 13). "
    if r2:
        text += f"Held-out R² ranges {min(r2):.2f}–{max(r2):.2f} (paper: ≥ 0.78, adjacent widths 0.95–0.97). "
    if gain:
        text += (
            "Adding the smaller SAE's nonlinear-error norm as a second regressor changes the held-out "
            f"unexplained variance by {min(gain):+.1f}% to {max(gain):+.1f}% (paper: reductions up to "
            "about 5–6.5%)."
        )
    return "<h2>Per-token scaling (Figs 4, 5, 12, 16)</h2>" + _p(text) + _figures(out, res)


def _norm_prediction_section(out: Path, res: dict[str, Any]) -> str:
    paper = {
        "x": "0.98–0.99",
        "sae": "0.93–0.99",
        "error": "0.85–0.96",
        "linear": "0.93–0.97",
        "nonlinear": "0.80–0.95",
    }
    rows = []
    for q in res["quantities"]:
        vals = [v[q] for v in res["r2"].values()]
        rows.append(
            f"<tr><td>{html.escape(q)}</td><td>{min(vals):.3f}–{max(vals):.3f}</td>"
            f"<td>{paper.get(q, '')}</td></tr>"
        )
    head = "<tr><th>‖q‖² for q =</th><th>R² here (over SAEs)</th><th>paper (typical)</th></tr>"
    text = (
        "How well x predicts the squared norm of each component. The paper finds the nonlinear error the "
        "least predictable, so it is not a sparse sum of linear features of x."
    )
    return (
        "<h2>Norm-prediction test (Fig 6)</h2>"
        + _p(text)
        + f"<table>{head}{''.join(rows)}</table>"
        + _figures(out, res)
    )


def _probe_section(out: Path, res: dict[str, Any]) -> str:
    text = (
        f"SAE {html.escape(res['sae'])}: a probe from Sae(x) − b_dec to its squared norm reaches held-out R² "
        f"{res['probe_r2']:.3f}; its dot product with each unit decoder direction correlates r = "
        f"{res['correlation']:.2f} with E[w²]/E[w] of that latent when active, over {res['n_latents']} "
        "latents "
        "(the App. C.1 prediction; the paper shows the two lining up)."
    )
    return "<h2>Norm probe vs latent activations (Fig 14)</h2>" + _p(text) + _figures(out, res)


def _layer_section(out: Path, res: dict[str, Any]) -> str:
    head = (
        "<tr><th>layer</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in res["r2"]) + "<th>FVU</th></tr>"
    )
    rows = "".join(
        f"<tr><td>{la}</td>"
        + "".join(f"<td>{res['r2'][k][i]:.3f}</td>" for k in res["r2"])
        + f"<td>{res['fvu'][i]:.3f}</td></tr>"
        for i, la in enumerate(res["layers"])
    )
    text = (
        "R² of predicting each layer's SAE squared error norm (held out). Paper (Gemma 2 9B): activations "
        "0.61 at layer 0 then 0.88–0.95; token identity 0.98 at layer 0 falling to ≈0.22; L0 up to ≈0.87; "
        "activation norm 0.15–0.57; model loss ≈0."
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in res.get("notes", []))
    return (
        "<h2>Error-norm baselines across layers (Figs 3, 13)</h2>"
        + _p(text)
        + f"<table>{head}{rows}</table>"
        + (f"<ul class='note'>{notes}</ul>" if notes else "")
        + _figures(out, res)
    )


def _synthetic_section(out: Path, res: dict[str, Any]) -> str:
    t, paper = res.get("table1"), res.get("table1_paper")

    def cell(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}"

    rows = ""
    if t:
        labels = ["activation noise σ_act", "reconstruction noise σ_rec"]
        rows = "".join(
            f"<tr><td>{labels[i]}</td><td>{cell(t[i][0])}</td><td>{cell(t[i][1])}</td>"
            + (f"<td>{cell(paper[i][0])} / {cell(paper[i][1])}</td>" if paper else "")
            + "</tr>"
            for i in range(2)
        )
    head = (
        "<tr><th>correlation over the 25 settings</th><th>est. Dense (linear)</th>"
        "<th>est. Introduced (nonlinear)</th>" + ("<th>paper</th>" if paper else "") + "</tr>"
    )
    text = (
        f"x′ = Sae(x) for {res.get('n_tokens')} tokens of SAE {html.escape(str(res.get('sae_name')))}, with "
        "Gaussian noise added to the input (Dense) and to the reconstruction (Introduced). The estimated "
        "linear error tracks the input noise and the estimated nonlinear error the reconstruction noise "
        f"when the diagonal dominates: {'yes' if res.get('diagonal_ok') else 'no'}."
    )
    return (
        "<h2>Synthetic simulation (Table 1, Fig 15, App. D)</h2>"
        + _p(text)
        + (f"<table>{head}{rows}</table>" if rows else "")
        + _figures(out, res)
    )


def _pursuit_section(out: Path, res: dict[str, Any]) -> str:
    head = (
        "<tr><th>SAE</th><th>FVU</th><th>pursuit FVU</th><th>FVU_nonlinear</th><th>pursuit FVU_nonlinear</th>"
        "<th>encoder error</th></tr>"
    )
    rows = "".join(
        f"<tr><td>{html.escape(r['name'])}</td><td>{r['fvu']:.4f}</td><td>{r['pursuit_fvu']:.4f}</td>"
        f"<td>{r['fvu_nonlinear']:.4f}</td><td>{r['pursuit_fvu_nonlinear']:.4f}</td><td>{r['encoder_error']:.4f}</td></tr>"
        for r in res["saes"]
    )
    text = (
        "Gradient pursuit over each SAE's decoder with each token's own L0 as budget, on "
        f"{res['n_contexts']} contexts. The paper finds pursuit lowers total FVU by 3–5% but barely moves "
        'FVU_nonlinear (0.122 → ≈0.117): a thin "encoder error" band.'
    )
    return (
        "<h2>Gradient pursuit (Figs 1, 10a)</h2>"
        + _p(text)
        + f"<table>{head}{rows}</table>"
        + _figures(out, res)
    )


def _downstream_section(out: Path, res: dict[str, Any]) -> str:
    head = (
        "<tr><th>SAE</th><th>CE clean → Sae(x)</th><th>CE recovered: linear / nonlinear</th>"
        "<th>variance share</th><th>norm share</th><th>CE loss score</th></tr>"
    )

    def pct(v: Any) -> str:
        return "—" if v is None else f"{100 * v:.0f}%"

    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{res['clean_ce']:.3f} → {r['ce']['sae']:.3f}</td>"
        f"<td>{pct(r['ce_recovered_linear'])} / {pct(r['ce_recovered_nonlinear'])}</td>"
        f"<td>{pct(r['variance_share_linear'])} / {pct(r['variance_share_nonlinear'])}</td>"
        f"<td>{pct(r['norm_share_linear'])} / {pct(r['norm_share_nonlinear'])}</td><td>{pct(r['ce_loss_score'])}</td></tr>"
        for n, r in res["saes"].items()
    )
    text = (
        f"Splicing Sae(x) plus one error component at positions ≥ {res['start']} of {res['n_contexts']} held-out "
        "contexts (never harvested). CE recovered = (L_sae − L_component)/(L_sae − L_clean). Paper (Gemma 2 9B): "
        "both components recover CE roughly in proportion to their size, linear slightly more, summing past "
        "100%. Splicing Sae(x) + both components reproduces the clean CE (checked on every run)."
    )
    return (
        "<h2>Downstream cross-entropy (Figs 8, 9)</h2>"
        + _p(text)
        + f"<table>{head}{rows}</table>"
        + _figures(out, res)
    )


def _earlier_section(out: Path, res: dict[str, Any]) -> str:
    if not res.get("regressors"):
        return "<h2>Earlier-layer predictors (Figs 9b, 10b)</h2>" + _p(
            html.escape("; ".join(res.get("notes", [])))
        )
    head = "<tr><th>regressor</th><th>NonlinearError</th><th>SaeError</th><th>LinearError</th><th>paper</th></tr>"
    raw = res.get("paper_r2", {})

    def paper_key(name: str) -> str:
        if name == "self":
            return "residual"
        for part, key in ((".mlp", "MLP"), (".attn", "attention"), (".resid", "prev residual")):
            if part in name:
                return key
        return name

    paper = {r: raw[paper_key(r)] for r in res["regressors"] if paper_key(r) in raw}
    rows = "".join(
        f"<tr><td>{html.escape(r)}</td>"
        + "".join(f"<td>{res['r2'][r][t]:.3f}</td>" for t in ("nonlinear", "error", "linear"))
        + f"<td>{' / '.join(f'{paper[r][t]:.2f}' for t in ('nonlinear', 'error', 'linear')) if r in paper else ''}</td></tr>"
        for r in res["regressors"]
    )
    mlp = res.get("mlp_probe", {})
    text = (
        f"R² (mean over dimensions, held out) of the error components of {html.escape(res.get('target', ''))} "
        "regressed on other SAEs' reconstructions; 'joint' uses all of them (beyond the paper). With the joint map "
        f"FVU goes from {res['fvu_sae']:.3f} (Sae(x)) to {res['fvu_with'].get('joint', float('nan')):.3f}."
    )
    if "r2_nonlinear_mean_over_dims" in mlp:
        text += (
            f" An MLP probe on top of the linear probe explains {mlp['r2_nonlinear_mean_over_dims']:.1%} of the "
            "nonlinear error (mean-over-dims R²)."
        )
    return (
        "<h2>Earlier-layer predictors (Figs 9b, 10b)</h2>"
        + _p(text)
        + f"<table>{head}{rows}</table>"
        + _figures(out, res)
    )


def _error_saes_section(out: Path, res: dict[str, Any]) -> str:
    head = (
        "<tr><th>trained on</th><th>held-out FVU</th><th>L0</th><th>dead</th><th>variance / Var(x)</th></tr>"
    )
    var = res.get("variance_ratio", {})
    rows = "".join(
        f"<tr><td>{html.escape(c)} error</td><td>{q['fvu']:.3f}</td><td>{q['l0']:.1f}</td>"
        f"<td>{q['dead_fraction']:.1%}</td><td>{var.get(c, float('nan')):.3f}</td></tr>"
        for c, q in res["saes"].items()
    )
    text = (
        f"TopK SAEs of equal width and k trained on the error components of {html.escape(res.get('sae_name', ''))}"
        ", computed on the fly from the store with the engine's probe b*. FVU is relative to each component's own "
        "variance. Paper (Gemma 2 9B L20, width 16k, about 100M tokens each): final FVU ≈ 0.59 on NonlinearError vs "
        "≈ 0.54 on LinearError, the nonlinear error being the harder one."
    )
    return (
        "<h2>SAEs trained on the error components (Figs 7, 8)</h2>"
        + _p(text)
        + f"<table>{head}{rows}</table>"
        + _figures(out, res)
    )


def _autointerp_section(out: Path, res: dict[str, Any]) -> str:
    head = "<tr><th>SAE on</th><th>latents scored</th><th>skipped</th><th>Q10 (top decile)</th><th>Q1</th><th>not (TNR)</th><th>balanced</th><th>unparsed items</th></tr>"

    def acc(p: dict[str, Any]) -> str:
        if p.get("accuracy") is None:
            return "—"
        return f"{p['accuracy']:.2f} [{p['ci_low']:.2f}, {p['ci_high']:.2f}]"

    rows = ""
    weak = False
    judge = ""
    for c, r in res.get("components", {}).items():
        s = r["summary"]
        weak = weak or r.get("weak_judge", False)
        judge = r.get("judge", {}).get("model", judge)
        bal = (
            "—"
            if s.get("balanced_accuracy") is None
            else f"{s['balanced_accuracy']:.2f} [{s['balanced_ci_low']:.2f}, {s['balanced_ci_high']:.2f}]"
        )
        rows += (
            f"<tr><td>{html.escape(c)} error</td><td>{s['n_latents']}</td><td>{len(r.get('skipped', {}))}</td>"
            f"<td>{acc(s['deciles'][-1])}</td><td>{acc(s['deciles'][0])}</td><td>{acc(s['negatives'])}</td>"
            f"<td>{bal}</td><td>{s['counts']['failed_items']}</td></tr>"
        )
    text = (
        "Explanations from each latent's top-activating windows, then a detection test: the judge marks which "
        "unhighlighted windows (sampled per activation decile, plus windows where the latent never fires) match "
        "the explanation. Accuracies are pooled over latents with Wilson 95% intervals. Paper (Llama 3.1 70B as "
        "judge, 1000 latents per SAE): the SAE on the linear error is about 5 points more interpretable in every decile, "
        "e.g. Q10 0.70 vs 0.66, Q1 0.395 vs 0.365, negatives 0.77 vs 0.75."
    )
    if weak:
        text += (
            f" <b>The judge here ({html.escape(str(judge))}) is a small model: it often fails to answer in the "
            "required format (counted as unparsed) and its scores are a smoke test of the pipeline, not a "
            "measurement. Point error_saes.interp at a strong model through an OpenAI-compatible endpoint for "
            "real numbers.</b>"
        )
    if res.get("error"):
        text += f" <b>Stopped early: {html.escape(res['error'])}</b>"
    return (
        "<h2>Auto-interpretability of the error SAEs (Fig 8)</h2>"
        + _p(text)
        + f"<table>{head}{rows}</table>"
        + _figures(out, res)
    )


SECTIONS = {
    "harvest": lambda out, res: _harvest_section(res),
    "sae_family": _family_section,
    "error_prediction": _error_prediction_section,
    "per_token": _per_token_section,
    "norm_prediction": _norm_prediction_section,
    "probe_latents": _probe_section,
    "layer_baselines": _layer_section,
    "synthetic_simulation": _synthetic_section,
    "pursuit": _pursuit_section,
    "downstream_ce": _downstream_section,
    "earlier_layers": _earlier_section,
    "error_saes": _error_saes_section,
    "autointerp": _autointerp_section,
}


def render(out: str | Path) -> str:
    """The report's HTML for the results under ``out``."""
    results = read_all_results(out)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>sae-darkmatter report</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>SAE dark matter report</h1>",
        "<p class='note'>How much of a language model's activations a sparse autoencoder fails to "
        "reconstruct, and how that error splits into linearly predictable and nonlinear parts "
        "(Engels, Smith &amp; Tegmark, arXiv 2410.14670).</p>",
    ]
    out = Path(out)
    for name, section in SECTIONS.items():
        if name in results:
            parts.append(section(out, results[name]))
    parts.append("<h2>Configuration and provenance</h2>")
    for name, res in results.items():
        cfg_json = html.escape(json.dumps(res.get("config", {}), indent=2))
        parts.append(f"<h3>{html.escape(name)}</h3><pre>{cfg_json}</pre>")
        parts.append(
            table(
                [(k, v) for k, v in res.get("provenance", {}).items()]
                + [("config hash", res.get("config_hash")), ("seed", res.get("seed"))]
            )
        )
    parts.append(f"<p class='note'>sae-darkmatter {__version__}</p></body></html>")
    return "\n".join(parts)


def write_report(out: str | Path) -> Path:
    """Build ``OUT/report.html`` from the results (never recomputes anything)."""
    path = Path(out) / "report.html"
    atomic_write_bytes(path, render(out).encode("utf-8"))
    return path
