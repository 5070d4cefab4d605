"""The claims table at the top of the report: each of the paper's claims, ours with its interval, verdict."""

from __future__ import annotations

from darkmatter.claims import ClaimsTable
from darkmatter.claims.rule import Claim
from darkmatter.report.markup import ci, esc, grid, p

COLOURS = {"reproduces": "#1a7f37", "deviates": "#cf222e", "inconclusive": "#9a6700", "not run": "#57606a"}


def _region(c: Claim) -> str:
    low, high = c.region
    if low is None:
        return f"≤ {high:g}"
    if high is None:
        return f"≥ {low:g}"
    return f"{low:g} to {high:g}"


def _ours(c: Claim) -> str:
    if c.value is None:
        return "—"
    return f"{c.value:.3g}" + ci(c.interval, ".3g")


def _verdict(c: Claim) -> str:
    return f"<b style='color:{COLOURS[c.verdict]}'>{esc(c.verdict)}</b>"


def claims_section(claims: ClaimsTable) -> str:
    """The table of claims, the rule, and the verdict counts."""
    rows = [
        [
            esc(c.claim) + f"<br><span class='note'>{esc(c.where)}; id {esc(c.id)}</span>",
            esc(c.paper),
            esc(c.statistic) + f"<br><span class='note'>holds when {esc(_region(c))}</span>",
            _ours(c) + (f"<br><span class='note'>{esc(c.note)}</span>" if c.note else ""),
            _verdict(c),
        ]
        for c in claims.claims
    ]
    counts = ", ".join(f"{n} {esc(v)}" for v, n in claims.counts.items() if n)
    text = (
        f"{counts}. {esc(claims.rule)} Intervals are 95%; the kind of each is in "
        "<code>results/claims.json</code>. The regions are this report's reading of each claim, fixed in "
        "the code before any run; the paper's models and SAEs differ from these, so a deviation says what "
        "holds here, not that the paper is wrong."
    )
    header = ["the paper's claim", "paper", "statistic tested here", "ours [95% CI]", "verdict"]
    return "<h2>Claims: what reproduces here</h2>" + p(text) + grid(header, rows)
