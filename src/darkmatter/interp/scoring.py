"""Detection counts per activation decile, pooled over latents, with binomial 95% intervals.

Deciles are labelled as in the paper's plot: Q1 is the lowest-activation decile, Q10 the highest, and
"Not" is the true-negative rate on windows where the latent never fired. Counts are pooled over latents by
summing (the paper's choice), not by averaging per-latent accuracies.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel, Field

N_DECILES = 10
Z95 = 1.959963984540054


def wilson_interval(correct: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; ``(0, 1)`` when ``total`` is 0."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    z2 = z * z
    denom = 1.0 + z2 / total
    centre = (p + z2 / (2 * total)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


class Proportion(BaseModel):
    """An accuracy with its raw counts, Wilson 95% interval and the paper's Wald half-width."""

    label: str = Field(description="Q1..Q10 (lowest to highest decile), 'Not', or 'All positives'.")
    correct: int = Field(description="Items the judge answered correctly.")
    total: int = Field(description="Items with a parsed answer.")
    accuracy: float | None = Field(description="correct / total; None without items.")
    ci_low: float | None = Field(description="Wilson 95% interval, lower end.")
    ci_high: float | None = Field(description="Wilson 95% interval, upper end.")
    wald_half_width: float | None = Field(description="1.96·sqrt(p(1−p)/n), the paper's error bar.")

    @classmethod
    def of(cls, label: str, correct: int, total: int) -> Proportion:
        if total <= 0:
            return cls(
                label=label,
                correct=0,
                total=0,
                accuracy=None,
                ci_low=None,
                ci_high=None,
                wald_half_width=None,
            )
        p = correct / total
        lo, hi = wilson_interval(correct, total)
        return cls(
            label=label,
            correct=correct,
            total=total,
            accuracy=p,
            ci_low=lo,
            ci_high=hi,
            wald_half_width=Z95 * math.sqrt(p * (1 - p) / total),
        )


class DetectionCounts(BaseModel):
    """One latent's (or a pool's) detection tallies; decile lists are indexed 0 = Q1 (lowest) .. 9 = Q10."""

    decile_correct: list[int] = Field(default_factory=lambda: [0] * N_DECILES)
    decile_total: list[int] = Field(default_factory=lambda: [0] * N_DECILES)
    negative_correct: int = Field(default=0, description="Negatives the judge answered 0 for.")
    negative_total: int = Field(default=0, description="Negatives with a parsed answer.")
    failed_items: int = Field(
        default=0, description="Items whose prompt got no parsable answer (the paper's -1)."
    )
    failed_prompts: int = Field(default=0, description="Prompts that got no parsable answer.")

    def record(self, decile: int | None, answer: int) -> None:
        """Tally one parsed answer; ``decile`` is 1..10 for a positive, None for a negative."""
        if decile is None:
            self.negative_total += 1
            self.negative_correct += int(answer == 0)
        else:
            self.decile_total[decile - 1] += 1
            self.decile_correct[decile - 1] += int(answer == 1)

    def __add__(self, other: DetectionCounts) -> DetectionCounts:
        return DetectionCounts(
            decile_correct=[a + b for a, b in zip(self.decile_correct, other.decile_correct, strict=True)],
            decile_total=[a + b for a, b in zip(self.decile_total, other.decile_total, strict=True)],
            negative_correct=self.negative_correct + other.negative_correct,
            negative_total=self.negative_total + other.negative_total,
            failed_items=self.failed_items + other.failed_items,
            failed_prompts=self.failed_prompts + other.failed_prompts,
        )


class DetectionSummary(BaseModel):
    """Pooled detection accuracy: per decile, on negatives, and balanced over positives and negatives."""

    n_latents: int = Field(description="Latents whose counts were pooled.")
    deciles: list[Proportion] = Field(description="Q1 (lowest) .. Q10 (highest activation decile).")
    negatives: Proportion = Field(description="'Not': the true-negative rate.")
    positives: Proportion = Field(description="All deciles together: the recall.")
    balanced_accuracy: float | None = Field(description="(recall + true-negative rate) / 2.")
    balanced_ci_low: float | None = Field(description="95% interval (Wilson ends combined by MOVER).")
    balanced_ci_high: float | None = Field(description="95% interval, upper end.")
    counts: DetectionCounts = Field(description="The pooled raw counts.")


def summarize(per_latent: Iterable[DetectionCounts]) -> DetectionSummary:
    """Pool counts over latents by summing and derive accuracies with their intervals."""
    pooled = DetectionCounts()
    n = 0
    for c in per_latent:
        pooled = pooled + c
        n += 1
    deciles = [
        Proportion.of(f"Q{i + 1}", pooled.decile_correct[i], pooled.decile_total[i]) for i in range(N_DECILES)
    ]
    neg = Proportion.of("Not", pooled.negative_correct, pooled.negative_total)
    pos = Proportion.of("All positives", sum(pooled.decile_correct), sum(pooled.decile_total))
    bal, lo, hi = balanced(pos, neg)
    return DetectionSummary(
        n_latents=n,
        deciles=deciles,
        negatives=neg,
        positives=pos,
        balanced_accuracy=bal,
        balanced_ci_low=lo,
        balanced_ci_high=hi,
        counts=pooled,
    )


def balanced(a: Proportion, b: Proportion) -> tuple[float | None, float | None, float | None]:
    """Mean of two independent proportions; its interval combines their Wilson ends (Newcombe's MOVER)."""
    if a.accuracy is None or b.accuracy is None:
        return None, None, None
    assert a.ci_low is not None and a.ci_high is not None and b.ci_low is not None and b.ci_high is not None
    mean = (a.accuracy + b.accuracy) / 2
    lo = mean - math.hypot(a.accuracy - a.ci_low, b.accuracy - b.ci_low) / 2
    hi = mean + math.hypot(a.ci_high - a.accuracy, b.ci_high - b.accuracy) / 2
    return mean, max(0.0, lo), min(1.0, hi)
