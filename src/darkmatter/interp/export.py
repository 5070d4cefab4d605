"""Per-latent records of an auto-interp run as one JSON file: explanation, scores, top windows.

The file (``LatentsFile``, format ``darkmatter-latents`` version 1) holds, per scored latent, its
explanation, its detection and fuzzing scores with Wilson 95% intervals, and the top-activating windows
the explanation was written from, with the token strings and the latent's activation on every token. It is
written atomically: a reader sees the previous file or the complete new one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from darkmatter import atomic
from darkmatter.interp.autointerp import AutoInterpResult
from darkmatter.interp.examples import LatentExamples
from darkmatter.interp.fuzzing import FuzzCounts, FuzzSummary, summarize_fuzz
from darkmatter.interp.scoring import DetectionCounts, DetectionSummary, Proportion, summarize

LATENTS_FORMAT = "darkmatter-latents"
LATENTS_VERSION = 1


class Score(BaseModel):
    """A detection or fuzzing score: accuracy on the two kinds of item and their balanced mean."""

    balanced_accuracy: float | None = Field(description="(positives + negatives accuracy) / 2.")
    ci_low: float | None = Field(description="95% interval of the balanced accuracy (Wilson ends, MOVER).")
    ci_high: float | None = Field(description="95% interval, upper end.")
    positives: Proportion = Field(
        description="Detection: activating windows answered 1. Fuzzing: windows marked at the latent's "
        "tokens answered 1."
    )
    negatives: Proportion = Field(
        description="Detection: non-activating windows answered 0. Fuzzing: windows marked at random "
        "tokens answered 0."
    )
    failed_items: int = Field(description="Items whose prompt got no parsable answer (excluded).")

    @classmethod
    def detection(cls, s: DetectionSummary) -> Score:
        return cls(
            balanced_accuracy=s.balanced_accuracy,
            ci_low=s.balanced_ci_low,
            ci_high=s.balanced_ci_high,
            positives=s.positives,
            negatives=s.negatives,
            failed_items=s.counts.failed_items,
        )

    @classmethod
    def fuzzing(cls, s: FuzzSummary) -> Score:
        return cls(
            balanced_accuracy=s.balanced_accuracy,
            ci_low=s.balanced_ci_low,
            ci_high=s.balanced_ci_high,
            positives=s.true_marks,
            negatives=s.random_marks,
            failed_items=s.counts.failed_items,
        )


class Window(BaseModel):
    """One top-activating window: its place in the store, its tokens and the latent's activations."""

    context: int = Field(description="Context index in the activation store.")
    start: int = Field(description="Position of the window's first token in its context.")
    token_ids: list[int] = Field(description="Token ids.")
    tokens: list[str] = Field(description="Each token decoded on its own.")
    activations: list[float] = Field(description="The latent's activation on each token.")
    max_activation: float = Field(description="Max over the window.")


class LatentRecord(BaseModel):
    """One scored latent."""

    latent: int
    explanation: str = Field(description="The judge's explanation ('' when none could be parsed).")
    explanation_parsed: bool
    n_active_tokens: int = Field(description="Streamed tokens where the latent is > 0.")
    n_active_windows: int = Field(description="Windows where the latent is > 0 somewhere.")
    detection: Score
    fuzzing: Score | None = Field(description="None when fuzzing was off.")
    n_judge_calls: int = Field(description="Chat requests made when this latent was scored.")
    top_windows: list[Window] = Field(description="The windows shown to the explainer, descending.")


class LatentsFile(BaseModel):
    """All scored latents of one SAE (one error component in a study), with pooled scores."""

    format: str = LATENTS_FORMAT
    version: int = LATENTS_VERSION
    meta: dict[str, Any] = Field(default_factory=dict, description="What was scored, e.g. sae, component.")
    judge: dict[str, Any] = Field(description="The judge's describe(): kind, model, weak, ...")
    settings: dict[str, Any] = Field(description="The auto-interp settings.")
    detection: Score = Field(description="Detection pooled (summed) over the latents.")
    fuzzing: Score | None = Field(description="Fuzzing pooled likewise; None when off.")
    latents: list[LatentRecord] = Field(description="In the order scored.")
    skipped: dict[int, str] = Field(description="Unscored latents and why.")


def _detection(counts: DetectionCounts) -> Score:
    return Score.detection(summarize([counts]))


def _fuzzing(counts: FuzzCounts | None) -> Score | None:
    return None if counts is None else Score.fuzzing(summarize_fuzz([counts]))


def latent_records(
    result: AutoInterpResult,
    examples: Mapping[int, LatentExamples],
    decode: Callable[[list[int]], list[str]],
    meta: dict[str, Any] | None = None,
) -> LatentsFile:
    """The records of ``result``'s latents, with the windows of ``examples`` its explanations came from."""
    n_top = int(result.settings.get("n_examples_explain", 10))
    records = []
    for li in result.latents:
        ex = examples[li.latent]
        windows = [
            Window(
                context=e.context,
                start=e.start,
                token_ids=e.tokens,
                tokens=list(decode(e.tokens)),
                activations=e.acts,
                max_activation=e.max_act,
            )
            for e in ex.top[:n_top]
        ]
        records.append(
            LatentRecord(
                latent=li.latent,
                explanation=li.explanation,
                explanation_parsed=li.explanation_parsed,
                n_active_tokens=ex.n_active_tokens,
                n_active_windows=ex.n_active_windows,
                detection=_detection(li.counts),
                fuzzing=_fuzzing(li.fuzzing),
                n_judge_calls=li.n_judge_calls,
                top_windows=windows,
            )
        )
    return LatentsFile(
        meta=dict(meta or {}),
        judge=result.judge,
        settings=result.settings,
        detection=Score.detection(result.summary),
        fuzzing=None if result.fuzzing is None else Score.fuzzing(result.fuzzing),
        latents=records,
        skipped=result.skipped,
    )


def write_latent_records(path: str | Path, records: LatentsFile) -> Path:
    """Write ``records`` to ``path`` as JSON, atomically; returns the path."""
    atomic.write_json(path, records.model_dump(mode="json"))
    return Path(path)
