"""Small HTML builders shared by the report's sections."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

JACKKNIFE_NOTE = (
    "95% intervals from a delete-one-block jackknife over blocks of whole contexts, every probe refitted "
    "in each replicate."
)
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


def ci(interval: Sequence[float] | None, spec: str = ".3f", scale: float = 1.0) -> str:
    """`` [low, high]`` of a 95% interval in small print ('' without one)."""
    if not interval or len(interval) != 2:
        return ""
    low, high = (scale * float(v) for v in interval)
    return f" <span class='ci'>[{low:{spec}}, {high:{spec}}]</span>"


def with_ci(
    value: float | None, interval: Sequence[float] | None, spec: str = ".3f", scale: float = 1.0
) -> str:
    """A value and its 95% interval: ``0.123 [0.118, 0.129]`` ('—' without a value)."""
    if value is None:
        return "—"
    return f"{scale * float(value):{spec}}" + ci(interval, spec, scale)
