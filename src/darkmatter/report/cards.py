"""Latent cards: per scored latent, its explanation, scores and top-activating windows with each token
shaded by the latent's activation, drawn from the auto-interp records ``interp/latents-<component>.json``.

Shading is one of ``LEVELS`` CSS classes (``s1`` faintest .. ``s10`` strongest) set by the token's
activation over the card's highest; each window's maximum token is outlined and every token's title holds
its value. Everything is inline HTML and CSS, so the report stays a single file that needs no network.
"""

from __future__ import annotations

import math
from pathlib import Path

from darkmatter.interp.export import LatentRecord, LatentsFile, Score, Window
from darkmatter.report.markup import ci, esc, p
from darkmatter.study.steps.autointerp import SAE_ITSELF, AutoInterpStepResult

LEVELS = 10
"""Shading steps of a token: 0 (inactive) and 1 .. LEVELS, by activation over the card's highest."""
WINDOWS_PER_CARD = 5
"""Top windows shown per card (the records hold all the explanation was written from)."""
CARDS_PER_COMPONENT = 24
"""Cards drawn per component, in the records' order (a seeded sample); the rest are only in the JSON."""
OPEN_CARDS = 4
"""Cards shown open per component; the others are folded into one <details>."""
HIGHLIGHT_RGB = "255,122,0"

CARD_CSS = (
    ".cards{margin:1rem 0}"
    ".card{border:1px solid #d0d7de;border-radius:6px;padding:.5rem .8rem;margin:.6rem 0}"
    ".card .ex{margin:.3rem 0;font-style:italic}.card .ex.none{color:#9a6700;font-style:normal}"
    ".card .sc{font-size:.9em}"
    ".win{font:.82rem/1.7 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;margin:.15rem 0;"
    "display:flex;gap:.6rem}"
    ".win .wm{color:#57606a;min-width:3.5rem;text-align:right;flex:none}"
    ".t{white-space:pre;border-radius:2px}.t.c{color:#6e7781}"
    ".t.mx{outline:2px solid #9a3412;outline-offset:-1px;font-weight:700}"
    ".cards summary{cursor:pointer;color:#0969da;margin:.4rem 0}"
    + "".join(f".s{i}{{background:rgba({HIGHLIGHT_RGB},{i / LEVELS:.2g})}}" for i in range(1, LEVELS + 1))
)
"""Styles of the cards, added to the report's stylesheet."""

_VISIBLE = {"\n": "↵", "\r": "␍", "\t": "⇥"}


def shown(token: str) -> str:
    """A token as printed on a card: line breaks and tabs as symbols, other control characters escaped,
    the empty token as ∅ (spaces are kept; the card's CSS preserves them)."""
    if not token:
        return "∅"
    return "".join(
        _VISIBLE.get(c) or (c if c.isprintable() or c == " " else c.encode("unicode_escape").decode())
        for c in token
    )


def level(activation: float, top: float) -> int:
    """Shading step of ``activation`` on a card whose highest activation is ``top``: 0 when not positive,
    else ceil(LEVELS · activation / top) within 1 .. LEVELS."""
    if not (activation > 0 and top > 0) or not math.isfinite(activation):
        return 0
    return min(LEVELS, max(1, math.ceil(LEVELS * activation / top)))


def window_html(w: Window, top: float) -> str:
    """One window: its maximum, then its tokens, shaded by activation, the window's maximum outlined."""
    peak = max(range(len(w.activations)), key=w.activations.__getitem__, default=-1)
    spans = []
    for i, (tok, act) in enumerate(zip(w.tokens, w.activations, strict=False)):
        text = shown(tok)
        classes = ["t"] if text == tok else ["t", "c"]
        step = level(act, top)
        if step:
            classes.append(f"s{step}")
        if i == peak and step:
            classes.append("mx")
        title = f"{tok!r}: {act:.4g}"
        spans.append(f'<span class="{" ".join(classes)}" title="{esc(title)}">{esc(text)}</span>')
    where = f"context {w.context}, positions {w.start}–{w.start + len(w.tokens) - 1}"
    return (
        f'<div class="win" title="{esc(where)}"><span class="wm">{w.max_activation:.3g}</span>'
        f"<span>{''.join(spans)}</span></div>"
    )


def _score(name: str, s: Score | None, positives: str, negatives: str) -> str:
    if s is None:
        return f"{name} off"
    value = "—" if s.balanced_accuracy is None else f"{s.balanced_accuracy:.2f}{ci(_interval(s), '.2f')}"
    pos, neg = s.positives, s.negatives
    return (
        f"{name} {value} <span class='note'>({positives} {pos.correct}/{pos.total}, {negatives} "
        f"{neg.correct}/{neg.total})</span>"
    )


def _interval(s: Score) -> list[float] | None:
    return None if s.ci_low is None or s.ci_high is None else [s.ci_low, s.ci_high]


def explanation_html(rec: LatentRecord, judge_kind: str = "") -> str:
    """The explanation in quotes, or a plain "not explained" saying why."""
    text = rec.explanation.strip()
    if rec.explanation_parsed and text:
        return f"<p class='ex'>“{esc(text)}”</p>"
    if judge_kind == "none":
        why = "no judge was asked"
    elif not rec.explanation_parsed:
        why = "the judge's reply could not be parsed"
    else:
        why = "the judge's explanation was empty"
    return f"<p class='ex none'>not explained: {why}</p>"


def card_html(rec: LatentRecord, component: str, what: str, judge_kind: str = "") -> str:
    """One latent's card: id, where it fires, explanation, detection and fuzzing, its top windows."""
    top = max((a for w in rec.top_windows for a in w.activations), default=0.0)
    windows = rec.top_windows[:WINDOWS_PER_CARD]
    more = len(rec.top_windows) - len(windows)
    scores = " · ".join(
        [
            _score("detection", rec.detection, "activating", "not"),
            _score("fuzzing", rec.fuzzing, "latent's marks", "random marks"),
        ]
    )
    return (
        f'<div class="card" id="latent-{esc(component)}-{rec.latent}">'
        f"<div><b>latent {rec.latent}</b> <span class='note'>{esc(what)} · active on "
        f"{rec.n_active_tokens:,} tokens in {rec.n_active_windows:,} windows · "
        f"{rec.n_judge_calls} judge calls</span></div>"
        + explanation_html(rec, judge_kind)
        + f"<div class='sc'>{scores}</div>"
        + "".join(window_html(w, top) for w in windows)
        + (
            f"<div class='note'>{len(windows)} of {len(rec.top_windows)} top windows shown</div>"
            if more
            else ""
        )
        + "</div>"
    )


def component_cards(records: LatentsFile, component: str, title: str, what: str, source: str) -> str:
    """The cards of one component's records under one heading: the first ``OPEN_CARDS`` open, up to
    ``CARDS_PER_COMPONENT`` in all."""
    kind = str(records.judge.get("kind", ""))
    cards = [card_html(r, component, what, kind) for r in records.latents[:CARDS_PER_COMPONENT]]
    n = len(records.latents)
    intro = f"{n} scored latent{'s' if n != 1 else ''}"
    if n > len(cards):
        intro += f", the first {len(cards)} shown"
    if records.skipped:
        skipped = "; ".join(f"{k}: {esc(v)}" for k, v in sorted(records.skipped.items()))
        intro += f"; {len(records.skipped)} skipped ({skipped})"
    judge = esc(str(records.judge.get("model", kind or "unknown")))
    intro += f". Judge: {judge}; records: <code>{esc(source)}</code>."
    folded = cards[OPEN_CARDS:]
    body = "".join(cards[:OPEN_CARDS]) + (
        f"<details><summary>{len(folded)} more latent{'s' if len(folded) != 1 else ''}</summary>"
        + "".join(folded)
        + "</details>"
        if folded
        else ""
    )
    return (
        f'<div class="cards" data-component="{esc(component)}"><h3>{esc(title)}</h3>'
        + f"<p class='note'>{intro}</p>"
        + body
        + "</div>"
    )


def read_records(path: Path) -> LatentsFile | str:
    """The records at ``path``, or why there are none to show."""
    if not path.is_file():
        return "missing"
    try:
        return LatentsFile.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        return f"unreadable ({exc.__class__.__name__})"


def latent_cards(res: AutoInterpStepResult, run_dir: Path) -> str:
    """Cards of every component's scored latents and of the split SAE's own, from their records."""
    parts = []
    wanted = [(c, f"{c} error") for c in res.components]
    if res.sae_scores is not None:
        wanted.append((SAE_ITSELF, f"{res.sae} itself"))
    for component, what in wanted:
        source = f"interp/latents-{component}.json"
        records = read_records(run_dir / source)
        if isinstance(records, str):
            parts.append(p(f"<span class='note'>No cards for the {esc(what)}: {source} is {records}.</span>"))
            continue
        if records.meta.get("sae") not in (None, res.sae):
            parts.append(
                p(
                    f"<span class='note'>No cards for the {esc(what)}: {source} holds latents of "
                    f"{esc(str(records.meta.get('sae')))}, not {esc(res.sae)}; run the autointerp step "
                    "again.</span>"
                )
            )
            continue
        title = (
            f"Latent cards: {res.sae} itself (sample)"
            if component == SAE_ITSELF
            else f"Latent cards: SAE on the {component} error"
        )
        parts.append(component_cards(records, component, title, what, source))
    if not parts:
        return ""
    legend = (
        "Each card shows a latent's explanation, its detection and fuzzing scores (balanced accuracy with "
        "its 95% interval; the counts behind it in brackets) and its top-activating windows, highest first "
        "(the number on the left is the window's maximum). Token shading follows the latent's activation "
        "relative to the highest on the card; each window's maximum token is outlined; hover a token for "
        "its value. ↵ marks a line break."
    )
    return p(legend) + "".join(parts)
