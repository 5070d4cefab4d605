"""Explain each latent from its top examples, then score the explanation by detection (paper §6.4).

Per latent: the explanation prompt shows the top ``n_examples_explain`` windows; the test set is
``n_per_decile`` windows sampled from each activation decile plus ``n_negatives`` never-firing windows,
shuffled with a seeded RNG and sent ``batch_size`` per detection prompt. Unparsable answers are the paper's
-1: excluded from the counts and tallied as failures. Every finished latent is saved to ``cache_path`` at
once, so a killed or failed run resumes without asking the judge again for them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from darkmatter import atomic
from darkmatter.errors import ConfigError, EndpointError, StoreError
from darkmatter.hashing import stable_hash
from darkmatter.interp.examples import Example, LatentExamples
from darkmatter.interp.judges import BinaryJudge, EndpointJudge, Judge, Message
from darkmatter.interp.prompts import (
    PROMPT_VERSION,
    detection_messages,
    explanation_messages,
    parse_detection,
    parse_explanation,
)
from darkmatter.interp.scoring import N_DECILES, DetectionCounts, DetectionSummary, summarize
from darkmatter.progress import Progress, Ticker

Decode = Callable[[list[int]], list[str]]  # token ids -> one string per token
Unparsable = Literal["raise", "count"]
CACHE_FORMAT = "darkmatter-autointerp-cache"
CACHE_VERSION = 1
T = TypeVar("T")


class LatentInterp(BaseModel):
    """One latent's explanation and detection counts."""

    latent: int
    explanation: str = Field(description="The judge's explanation ('' when none could be parsed).")
    explanation_parsed: bool = Field(description="False when the explanation reply was unusable.")
    counts: DetectionCounts
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
    n_cached: int = Field(default=0, description="Latents taken from the cache instead of asking the judge.")


def _sample(rng: np.random.Generator, items: Sequence[T], k: int) -> list[T]:
    if len(items) <= k:
        return list(items)
    return [items[i] for i in sorted(rng.choice(len(items), size=k, replace=False).tolist())]


def _test_set(
    ex: LatentExamples, seed: int, n_per_decile: int, n_negatives: int
) -> list[tuple[Example, int | None]]:
    """(example, decile or None for a negative), shuffled; depends only on the seed and the latent."""
    rng = np.random.default_rng([seed, ex.latent])
    items: list[tuple[Example, int | None]] = []
    for d in range(1, N_DECILES + 1):
        items += [(e, d) for e in _sample(rng, ex.deciles.get(d, []), n_per_decile)]
    items += [(e, None) for e in _sample(rng, ex.negatives, n_negatives)]
    return [items[i] for i in rng.permutation(len(items)).tolist()]


class _Asker:
    """Asks the judge, re-asking on unparsable replies; raises or returns None per the policy."""

    def __init__(self, judge: Judge, policy: Unparsable, reasks: int) -> None:
        self.judge, self.policy, self.reasks = judge, policy, reasks
        self.calls = 0

    def ask(
        self, messages: list[Message], max_tokens: int, parse: Callable[[str], T | None], what: str
    ) -> T | None:
        reply = ""
        for _ in range(self.reasks + 1):
            reply = self.judge.chat(messages, max_tokens=max_tokens)
            self.calls += 1
            parsed = parse(reply)
            if parsed is not None:
                return parsed
        if self.policy == "raise":
            excerpt = " ".join(reply.split())[:80]
            raise EndpointError(
                f"Judge {self.judge.describe().get('model')} answers text that is not {what} "
                f"({self.reasks + 1} attempt(s); last reply {excerpt!r}); use a stronger model or check the "
                "endpoint's chat template."
            )
        return None

    def detect(self, messages: list[Message], n: int) -> list[int] | None:
        """A constrained detection answer from a judge that can give one (None: ask in free text)."""
        assert isinstance(self.judge, BinaryJudge)
        answers = self.judge.detect(messages, n)
        self.calls += answers is not None
        return answers


def _decoded(decode: Decode, ids: list[int]) -> list[str]:
    strings = decode(ids)
    if len(strings) != len(ids):
        raise ConfigError(
            f"decode returned {len(strings)} strings for {len(ids)} token ids; it must return one per token."
        )
    return strings


def _latent_key(
    ex: LatentExamples, judge: dict[str, Any], settings: dict[str, Any], explain: list[Message]
) -> str:
    """Cache key of one latent: the judge, the settings, the explanation prompt and the examples."""
    return stable_hash(
        {
            "judge": {k: judge.get(k) for k in ("kind", "model")},
            "settings": settings,
            "explain": explain,
            "examples": ex.model_dump(mode="json"),
        }
    )


def _read_cache(path: Path) -> dict[int, LatentInterp]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
            raise ValueError("not an auto-interp cache of this version")
        return {int(k): LatentInterp.model_validate(v) for k, v in data["latents"].items()}
    except (ValueError, KeyError, AttributeError, TypeError, ValidationError) as exc:
        raise StoreError(
            f"Auto-interp cache {path} is unreadable ({exc.__class__.__name__}); delete it to start over."
        ) from exc


def _write_cache(path: Path, done: dict[int, LatentInterp]) -> None:
    atomic.write_json(
        path,
        {
            "format": CACHE_FORMAT,
            "version": CACHE_VERSION,
            "latents": {str(k): v.model_dump(mode="json") for k, v in sorted(done.items())},
        },
    )


def default_unparsable(judge: Judge) -> tuple[Unparsable, int]:
    """Endpoint judges: re-ask ``retries`` times, then raise. Others (a local, greedy judge): count."""
    if isinstance(judge, EndpointJudge):
        return "raise", judge.retries
    return "count", 0


@dataclass(frozen=True)
class _Settings:
    """Sampling and batching of one run; part of every latent's cache key."""

    seed: int
    n_examples_explain: int
    n_per_decile: int
    n_negatives: int
    batch_size: int
    explain_max_tokens: int
    detect_max_tokens: int

    def __post_init__(self) -> None:
        for name in ("n_examples_explain", "batch_size", "explain_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, found {getattr(self, name)}.")
        if self.n_per_decile < 0 or self.n_negatives < 0:
            raise ConfigError(
                f"n_per_decile and n_negatives must be >= 0; found {self.n_per_decile}, {self.n_negatives}."
            )

    def as_dict(self) -> dict[str, Any]:
        """The settings as recorded in results and cache keys (with the prompt version)."""
        return {**asdict(self), "prompt_version": PROMPT_VERSION}


def _answer_policy(judge: Judge, unparsable: Unparsable | None, reasks: int | None) -> tuple[Unparsable, int]:
    """The unparsable-answer policy and re-ask count: the arguments, else ``default_unparsable``'s."""
    policy, default_reasks = default_unparsable(judge)
    policy = unparsable or policy
    if policy not in ("raise", "count"):
        raise ConfigError(f"unparsable must be 'raise' or 'count', found {policy!r}.")
    reasks = default_reasks if reasks is None else reasks
    if reasks < 0:
        raise ConfigError(f"reasks must be >= 0, found {reasks}.")
    return policy, reasks


def _score_latent(
    ex: LatentExamples,
    asker: _Asker,
    decode: Decode,
    explain: list[Message],
    settings: _Settings,
    key: str,
) -> LatentInterp:
    """Ask for an explanation of ``ex``, then detection answers on its shuffled test set, in batches."""
    calls0 = asker.calls
    explanation = asker.ask(explain, settings.explain_max_tokens, parse_explanation, "an explanation")
    counts = DetectionCounts()
    tests = _test_set(ex, settings.seed, settings.n_per_decile, settings.n_negatives)
    for i in range(0, len(tests), settings.batch_size):
        chunk = tests[i : i + settings.batch_size]
        msgs = detection_messages(explanation or "", [_decoded(decode, e.tokens) for e, _ in chunk])
        n = len(chunk)
        answers = asker.detect(msgs, n) if isinstance(asker.judge, BinaryJudge) else None
        if answers is None:
            answers = asker.ask(
                msgs, settings.detect_max_tokens, partial(parse_detection, n=n), f"a list of {n} values 0/1"
            )
        if answers is None:
            counts.failed_items += n
            counts.failed_prompts += 1
            continue
        for (_, decile), a in zip(chunk, answers, strict=True):
            counts.record(decile, a)
    return LatentInterp(
        latent=ex.latent,
        explanation=explanation or "",
        explanation_parsed=explanation is not None,
        counts=counts,
        n_judge_calls=asker.calls - calls0,
        key=key,
    )


class _Cache:
    """Finished latents by id, saved to ``path`` (when given) after each one."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.done = _read_cache(path) if path is not None else {}

    def hit(self, latent: int, key: str) -> LatentInterp | None:
        """The cached result of ``latent`` when its key still matches, else None."""
        hit = self.done.get(latent)
        return hit if hit is not None and hit.key == key else None

    def save(self, li: LatentInterp) -> None:
        if self.path is not None:
            self.done[li.latent] = li
            _write_cache(self.path, self.done)

    def resume_hint(self, finished: int, total: int) -> str:
        """What a failed run leaves behind, for its error message."""
        return f"{finished} of {total} latents are finished and saved in {self.path}; run again to resume."


def run_autointerp(
    examples: Mapping[int, LatentExamples],
    judge: Judge,
    decode: Decode,
    *,
    seed: int = 0,
    n_examples_explain: int = 10,
    n_per_decile: int = 7,
    n_negatives: int = 50,
    batch_size: int = 4,
    explain_max_tokens: int = 50,
    detect_max_tokens: int | None = None,
    unparsable: Unparsable | None = None,
    reasks: int | None = None,
    cache_path: str | Path | None = None,
    progress: Progress | None = None,
) -> AutoInterpResult:
    """Explain and score every non-skipped latent of ``examples`` with ``judge``; see the module docstring.

    ``unparsable``: "raise" re-asks an unparsable reply ``reasks`` times and then raises EndpointError;
    "count" (after ``reasks`` re-asks) counts the prompt's items as failures. Defaults come from
    ``default_unparsable``.
    ``detect_max_tokens`` defaults to max(25, 6·batch_size) (the paper: 25 for 4 examples).
    ``progress(latents done, latents to score, latents per second)`` is called after each latent.
    """
    settings = _Settings(
        seed=seed,
        n_examples_explain=n_examples_explain,
        n_per_decile=n_per_decile,
        n_negatives=n_negatives,
        batch_size=batch_size,
        explain_max_tokens=explain_max_tokens,
        detect_max_tokens=detect_max_tokens or max(25, 6 * batch_size),
    )
    policy, reasks = _answer_policy(judge, unparsable, reasks)
    desc = judge.describe()
    cache = _Cache(Path(cache_path) if cache_path is not None else None)
    todo = [ex for ex in examples.values() if ex.skip_reason is None]
    skipped = {ex.latent: str(ex.skip_reason) for ex in examples.values() if ex.skip_reason is not None}
    asker = _Asker(judge, policy, reasks)
    results: list[LatentInterp] = []
    n_cached = 0
    ticker = Ticker(progress, len(todo))
    for ex in todo:
        top = ex.top[:n_examples_explain]
        explain = explanation_messages([(_decoded(decode, e.tokens), e.acts) for e in top])
        key = _latent_key(ex, desc, settings.as_dict(), explain)
        li = cache.hit(ex.latent, key)
        if li is not None:
            n_cached += 1
        else:
            try:
                li = _score_latent(ex, asker, decode, explain, settings, key)
            except EndpointError as exc:
                if cache.path is None:
                    raise
                raise EndpointError(f"{exc} {cache.resume_hint(len(results), len(todo))}") from exc
            cache.save(li)
        results.append(li)
        ticker.advance(1)
    summary = summarize(r.counts for r in results)
    return AutoInterpResult(
        judge=desc,
        weak_judge=bool(desc.get("weak", False)),
        notes=_notes(desc, summary),
        settings={**settings.as_dict(), "unparsable": policy, "reasks": reasks},
        latents=results,
        skipped=skipped,
        summary=summary,
        n_cached=n_cached,
    )


def _notes(desc: dict[str, Any], summary: DetectionSummary) -> list[str]:
    notes = []
    if desc.get("weak"):
        notes.append(
            f"The judge {desc.get('model')} is a small model: its explanations and detection accuracies "
            "are a smoke test of the pipeline, not comparable to the paper's (Llama-3.1-70B judge)."
        )
    c = summary.counts
    if c.failed_items:
        notes.append(
            f"{c.failed_items} test item(s) in {c.failed_prompts} prompt(s) got no parsable answer and are "
            "excluded from the accuracies, as in the paper."
        )
    return notes
