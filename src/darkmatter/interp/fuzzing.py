"""Fuzzing: does the explanation tell the latent's own tokens from randomly chosen ones (delphi's fuzzing)?

Each activating test window (the detection test set's decile samples) is shown once with tokens marked:
for a seeded half of them the latent's tokens (those the explanation prompt marks, above
``HIGHLIGHT_FRACTION`` of the window's max), for the other half as many randomly chosen tokens where the
latent is not active. The judge answers 1 (the marking is the latent's) or 0 per window. Counts are pooled
over latents by summing, as for detection, with Wilson intervals and a MOVER balanced accuracy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from pydantic import BaseModel, Field

from darkmatter.interp.examples import Example
from darkmatter.interp.prompts import highlight_mask
from darkmatter.interp.scoring import Proportion, balanced

FUZZ_STREAM = 1  # the fuzzing RNG's extra seed word, apart from the detection test set's


class FuzzCounts(BaseModel):
    """One latent's (or a pool's) fuzzing tallies."""

    true_correct: int = Field(default=0, description="Windows marked at the latent's tokens, answered 1.")
    true_total: int = Field(default=0, description="Windows marked at the latent's tokens, parsed.")
    random_correct: int = Field(default=0, description="Windows marked at random tokens, answered 0.")
    random_total: int = Field(default=0, description="Windows marked at random tokens, parsed.")
    failed_items: int = Field(default=0, description="Windows whose prompt got no parsable answer.")
    failed_prompts: int = Field(default=0, description="Prompts that got no parsable answer.")

    def record(self, truth: bool, answer: int) -> None:
        """Tally one parsed answer to a window marked at the latent's tokens (``truth``) or at random."""
        if truth:
            self.true_total += 1
            self.true_correct += int(answer == 1)
        else:
            self.random_total += 1
            self.random_correct += int(answer == 0)

    def __add__(self, other: FuzzCounts) -> FuzzCounts:
        return FuzzCounts(**{k: v + getattr(other, k) for k, v in self.model_dump().items()})


class FuzzSummary(BaseModel):
    """Pooled fuzzing accuracy: on truly and randomly marked windows, overall, and balanced."""

    n_latents: int = Field(description="Latents whose counts were pooled.")
    true_marks: Proportion = Field(description="Windows marked at the latent's tokens, answered 1.")
    random_marks: Proportion = Field(description="Windows marked at random tokens, answered 0.")
    overall: Proportion = Field(description="All parsed windows answered correctly.")
    balanced_accuracy: float | None = Field(description="(true-mark + random-mark accuracy) / 2.")
    balanced_ci_low: float | None = Field(description="95% interval (Wilson ends combined by MOVER).")
    balanced_ci_high: float | None = Field(description="95% interval, upper end.")
    counts: FuzzCounts = Field(description="The pooled raw counts.")


def summarize_fuzz(per_latent: Iterable[FuzzCounts]) -> FuzzSummary:
    """Pool fuzzing counts over latents by summing and derive accuracies with their intervals."""
    pooled, n = FuzzCounts(), 0
    for c in per_latent:
        pooled, n = pooled + c, n + 1
    true = Proportion.of("Latent's tokens", pooled.true_correct, pooled.true_total)
    rand = Proportion.of("Random tokens", pooled.random_correct, pooled.random_total)
    overall = Proportion.of(
        "All", pooled.true_correct + pooled.random_correct, pooled.true_total + pooled.random_total
    )
    bal, lo, hi = balanced(true, rand)
    return FuzzSummary(
        n_latents=n,
        true_marks=true,
        random_marks=rand,
        overall=overall,
        balanced_accuracy=bal,
        balanced_ci_low=lo,
        balanced_ci_high=hi,
        counts=pooled,
    )


def fuzz_items(windows: Sequence[Example], seed: int, latent: int) -> list[tuple[Example, list[bool], bool]]:
    """(window, marked tokens, marked at the latent's tokens?) per window, in the order given.

    Depends only on the seed, the latent and the windows. A window without a token where the latent is
    inactive gets its random marks outside the true ones; a window that has neither is shown truly marked.
    """
    rng = np.random.default_rng([seed, latent, FUZZ_STREAM])
    n = len(windows)
    truths = (rng.permutation(n) < (n + 1) // 2).tolist()
    out: list[tuple[Example, list[bool], bool]] = []
    for ex, truth in zip(windows, truths, strict=True):
        mask = highlight_mask(ex.acts)
        k = max(sum(mask), 1)
        if not truth:
            pool = [i for i, a in enumerate(ex.acts) if a <= 0] or [i for i, m in enumerate(mask) if not m]
            if pool:
                chosen = set(rng.choice(len(pool), size=min(k, len(pool)), replace=False).tolist())
                mask = [False] * len(mask)
                for j in chosen:
                    mask[pool[j]] = True
            else:
                truth = True
        out.append((ex, mask, bool(truth)))
    return out
