"""Automatic interpretability of SAE latents (paper §6.3–§6.5): examples, judges, prompts, detection and
fuzzing scores, per-latent JSON records.

Typical use::

    examples = collect_examples(store, acts_fn, latents, d_sae=sae.cfg.d_sae, min_activations=50)
    judge = EndpointJudge("http://127.0.0.1:8000/v1", "my-model")   # or LocalJudge.from_lm(load_lm())
    result = run_autointerp(examples, judge, decode, seed=0, fuzzing=True, concurrency=8,
                            cache_path=out / "autointerp-cache.json")
    write_latent_records(out / "latents.json", latent_records(result, examples, decode))
"""

from __future__ import annotations

from darkmatter.interp.autointerp import default_unparsable, run_autointerp
from darkmatter.interp.examples import Example, LatentExamples, collect_examples
from darkmatter.interp.export import LatentRecord, LatentsFile, latent_records, write_latent_records
from darkmatter.interp.fuzzing import FuzzCounts, FuzzSummary, summarize_fuzz
from darkmatter.interp.judges import EndpointJudge, Judge, LocalJudge
from darkmatter.interp.prompts import (
    detection_messages,
    explanation_messages,
    fuzzing_messages,
    parse_detection,
    parse_explanation,
    render,
)
from darkmatter.interp.results import AutoInterpResult, LatentInterp
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
    "FuzzCounts",
    "FuzzSummary",
    "Judge",
    "LatentExamples",
    "LatentInterp",
    "LatentRecord",
    "LatentsFile",
    "LocalJudge",
    "Proportion",
    "collect_examples",
    "default_unparsable",
    "detection_messages",
    "explanation_messages",
    "fuzzing_messages",
    "latent_records",
    "parse_detection",
    "parse_explanation",
    "render",
    "run_autointerp",
    "summarize",
    "summarize_fuzz",
    "wilson_interval",
    "write_latent_records",
]
