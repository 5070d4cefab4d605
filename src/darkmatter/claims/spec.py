"""Building a claim: its fixed text and region, then the measured statistic and the rule's verdict."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from darkmatter.claims.rule import Claim, decide
from darkmatter.stats.jackknife import finite_interval

JACKKNIFE = "95% delete-one-block jackknife over contexts"


@dataclass(frozen=True)
class ClaimSpec:
    """What a claim says and where it holds; ``measured`` turns it into a ``Claim``."""

    id: str
    claim: str
    where: str
    paper: str
    statistic: str
    region: tuple[float | None, float | None]

    def not_run(self, note: str) -> Claim:
        """The claim without a measurement (``note``: what is missing)."""
        return Claim(**self._text(), note=note)

    def measured(
        self, value: float, interval: Sequence[float] | None, kind: str = JACKKNIFE, note: str = ""
    ) -> Claim:
        """The claim with its statistic, interval and the rule's verdict."""
        if not math.isfinite(value):
            return self.not_run(note or "the statistic is undefined on these results")
        bounds = None if interval is None else [float(v) for v in interval]
        region = list(self.region)
        return Claim(
            **self._text(),
            value=float(value),
            interval=bounds,
            interval_kind=kind if bounds is not None else "",
            verdict=decide(bounds, region),
            note=note
            if bounds is not None
            else (note + "; " if note else "") + "no interval, so inconclusive",
        )

    def _text(self) -> dict[str, object]:
        return {
            "id": self.id,
            "claim": self.claim,
            "where": self.where,
            "paper": self.paper,
            "statistic": self.statistic,
            "region": list(self.region),
        }


def paired(
    points: dict[str, dict[str, float]],
    replicates: dict[str, dict[str, list[float]]],
    statistic: Callable[[dict[str, dict[str, float]]], float],
) -> tuple[float, list[float] | None]:
    """A statistic of several SAEs' numbers and its jackknife interval from their paired replicates.

    ``points[sae][key]`` are the full-data numbers, ``replicates[sae][key][b]`` the numbers without block
    ``b`` (the same blocks for every SAE of a site). The statistic is recomputed per block.
    """
    value = statistic(points)
    if not all(k in replicates.get(s, {}) for s in points for k in points[s]):
        return value, None
    lengths = {len(replicates[s][k]) for s in points for k in points[s]}
    if len(lengths) != 1:
        return value, None
    (n,) = lengths
    reps = [statistic({s: {k: replicates[s][k][b] for k in points[s]} for s in points}) for b in range(n)]
    return value, finite_interval(value, reps)
