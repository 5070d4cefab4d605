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


SECTIONS = {"harvest": _harvest_section}


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
    for name, res in results.items():
        section = SECTIONS.get(name)
        if section is not None:
            parts.append(section(res))
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
