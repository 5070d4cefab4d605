"""What an auto-interp run gives: per latent its explanation and counts, pooled over latents the scores."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from darkmatter.interp.fuzzing import FuzzCounts, FuzzSummary
from darkmatter.interp.scoring import DetectionCounts, DetectionSummary


class LatentInterp(BaseModel):
    """One latent's explanation and detection counts."""

    latent: int
    explanation: str = Field(description="The judge's explanation ('' when none could be parsed).")
    explanation_parsed: bool = Field(description="False when the explanation reply was unusable.")
    counts: DetectionCounts
    fuzzing: FuzzCounts | None = Field(default=None, description="Fuzzing counts; None when not scored.")
    n_judge_calls: int = Field(description="Chat requests made for this latent, re-asks included.")
    key: str = Field(description="Hash of the settings, judge model, prompts and examples (cache key).")


class AutoInterpResult(BaseModel):
    """Auto-interpretability of a set of latents: explanations, per-latent counts, pooled accuracies."""

    judge: dict[str, Any] = Field(description="The judge's describe(): kind, model, weak, ...")
    weak_judge: bool = Field(description="True for a small judge whose scores are only a smoke test.")
    notes: list[str] = Field(default_factory=list, description="Caveats a reader must know.")
    settings: dict[str, Any] = Field(description="Sampling, batching and answer-handling settings.")
    latents: list[LatentInterp] = Field(description="Scored latents, in the order given.")
    skipped: dict[int, str] = Field(default_factory=dict, description="Unscored latents and why.")
    summary: DetectionSummary = Field(description="Counts pooled (summed) over the scored latents.")
    fuzzing: FuzzSummary | None = Field(default=None, description="Fuzzing pooled likewise; None when off.")
    n_cached: int = Field(default=0, description="Latents taken from the cache instead of asking the judge.")
