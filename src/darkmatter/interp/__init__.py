"""Automatic interpretability of SAE latents (paper §6.3–§6.5): examples, judges, prompts, detection scores.

Typical use::

    examples = collect_examples(store, acts_fn, latents, d_sae=sae.cfg.d_sae, min_activations=50)
    judge = EndpointJudge("http://127.0.0.1:8000/v1", "my-model")   # or LocalJudge.from_lm(load_lm())
    result = run_autointerp(examples, judge, decode, seed=0, cache_path=out / "autointerp-cache.json")
"""

from __future__ import annotations

from darkmatter.interp.autointerp import (
    AutoInterpResult,
    LatentInterp,
    default_unparsable,
    run_autointerp,
)
from darkmatter.interp.examples import Example, LatentExamples, collect_examples
from darkmatter.interp.judges import EndpointJudge, Judge, LocalJudge
from darkmatter.interp.prompts import (
    detection_messages,
    explanation_messages,
    parse_detection,
    parse_explanation,
    render,
)
from darkmatter.interp.scoring import (
    DetectionCounts,
    DetectionSummary,
    Proportion,
    summarize,
    wilson_interval,
)

__all__ = [
    "AutoInterpResult",
    "DetectionCounts",
    "DetectionSummary",
    "EndpointJudge",
    "Example",
    "Judge",
    "LatentExamples",
    "LatentInterp",
    "LocalJudge",
    "Proportion",
    "collect_examples",
    "default_unparsable",
    "detection_messages",
    "explanation_messages",
    "parse_detection",
    "parse_explanation",
    "render",
    "run_autointerp",
    "summarize",
    "wilson_interval",
]
