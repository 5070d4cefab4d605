"""The self-contained HTML report: every result's section with its figures embedded as data URIs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from darkmatter import __version__
from darkmatter.claims import ClaimsTable
from darkmatter.report.cards import CARD_CSS
from darkmatter.report.claims_section import claims_section
from darkmatter.report.markup import Figures, esc, key_value_table
from darkmatter.report.sections import SECTIONS
from darkmatter.results import Result

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2rem auto;
padding:0 1rem;color:#1d232a;line-height:1.45}
h1{font-size:1.7rem}
h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2.2rem}
table{border-collapse:collapse;margin:.6rem 0}
td,th{border:1px solid #d0d7de;padding:.25rem .6rem;text-align:left}
th{background:#f6f8fa}figure{margin:1rem 0}img{max-width:100%;height:auto}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.8rem}.note{color:#57606a}
.ci{color:#57606a;font-size:.85em;white-space:nowrap}
"""


def _provenance(name: str, res: Result) -> str:
    cfg_json = esc(json.dumps(res.config, indent=2, default=str))
    rows: list[tuple[str, Any]] = list(res.provenance.model_dump().items())
    rows += [("config hash", res.config_hash), ("seed", res.seed)]
    return f"<h3>{esc(name)}</h3><pre>{cfg_json}</pre>" + key_value_table(rows)


def render(
    run_dir: Path, results: dict[str, Result], figures: dict[str, Figures], claims: ClaimsTable | None = None
) -> str:
    """The report's HTML for typed ``results`` (step name -> result), their drawn ``figures`` and the
    ``claims`` tested on them (shown first)."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<title>sae-darkmatter report</title>",
        f"<style>{CSS}{CARD_CSS}</style></head><body>",
        "<h1>SAE dark matter report</h1>",
        "<p class='note'>How much of a language model's activations a sparse autoencoder fails to "
        "reconstruct, and how that error splits into linearly predictable and nonlinear parts "
        "(Engels, Smith &amp; Tegmark, arXiv 2410.14670).</p>",
    ]
    if claims is not None:
        parts.append(claims_section(claims))
    for name, section in SECTIONS:
        if name in results:
            parts.append(section(results[name], figures.get(name, {}), run_dir))
    parts.append("<h2>Configuration and provenance</h2>")
    parts += [_provenance(name, res) for name, res in results.items()]
    parts.append(f"<p class='note'>sae-darkmatter {__version__}</p></body></html>")
    return "\n".join(parts)
