"""The claims table's model and its one verdict rule.

Each claim of the paper is turned into a statistic of our results and a *region*: the values of the
statistic for which the claim holds. With the statistic's 95% interval:

- **reproduces** when the whole interval lies inside the region;
- **deviates** when the whole interval lies outside it;
- **inconclusive** when the interval straddles a boundary of the region, or there is no interval;
- **not run** when the results the statistic needs are missing (a step disabled or not run).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

Verdict = Literal["reproduces", "deviates", "inconclusive", "not run"]
VERDICTS: tuple[Verdict, ...] = ("reproduces", "deviates", "inconclusive", "not run")

RULE = (
    "A claim reproduces when the 95% interval of its statistic lies wholly inside the region where the "
    "claim holds, deviates when it lies wholly outside, and is inconclusive when it straddles a boundary "
    "or has no interval; it is not run when the results it needs are missing."
)


class Claim(BaseModel):
    """One qualitative claim of the paper, the statistic that tests it here, and the verdict."""

    id: str = Field(description="Stable identifier.")
    claim: str = Field(description="The paper's claim, in words.")
    where: str = Field(description="Where the paper makes it.")
    paper: str = Field(description="The paper's numbers behind it.")
    statistic: str = Field(description="What is computed here to test it.")
    region: list[float | None] = Field(
        description="[low, high]: the statistic's values for which the claim holds (None: unbounded)."
    )
    value: float | None = Field(None, description="The statistic on this run's results.")
    interval: list[float] | None = Field(None, description="Its 95% interval [low, high].")
    interval_kind: str = Field("", description="How the interval was computed.")
    verdict: Verdict = "not run"
    note: str = Field("", description="Caveats, or what is missing.")


class ClaimsTable(BaseModel):
    """Every claim with its verdict, the rule, and the count of each verdict."""

    rule: str = RULE
    claims: list[Claim]
    counts: dict[str, int] = Field(description="Verdict -> number of claims.")


def inside(v: float, low: float | None, high: float | None) -> bool:
    """``v`` within the closed region ``[low, high]`` (a None end is unbounded)."""
    return (low is None or v >= low) and (high is None or v <= high)


def decide(interval: list[float] | None, region: list[float | None]) -> Verdict:
    """The rule (see the module docstring) for one interval and region."""
    if interval is None or not all(math.isfinite(v) for v in interval):
        return "inconclusive"
    low, high = region
    a, b = interval
    if inside(a, low, high) and inside(b, low, high):
        return "reproduces"
    if (high is not None and a > high) or (low is not None and b < low):
        return "deviates"
    return "inconclusive"


def table(claims: list[Claim]) -> ClaimsTable:
    """The claims with their counts."""
    return ClaimsTable(claims=claims, counts={v: sum(c.verdict == v for c in claims) for v in VERDICTS})
