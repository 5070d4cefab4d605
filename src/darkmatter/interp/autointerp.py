"""Explain each latent from its top examples, then score the explanation by detection (paper §6.4).

Per latent: the explanation prompt shows the top ``n_examples_explain`` windows; the test set is
``n_per_decile`` windows sampled from each activation decile plus ``n_negatives`` never-firing windows,
shuffled with a seeded RNG and sent ``batch_size`` per detection prompt. Unparsable answers are the paper's
-1: excluded from the counts and tallied as failures. With ``fuzzing`` the decile samples are also shown
with marked tokens (see ``darkmatter.interp.fuzzing``), ``batch_size`` per prompt: up to
ceil(10·n_per_decile / batch_size) extra requests per latent. Every finished latent is saved to
``cache_path`` at once, so a killed or failed run resumes without asking the judge again for them.

An endpoint judge scores up to ``concurrency`` latents at a time (threads; each latent's requests stay in
order). Every latent's prompts depend only on the seed and its own examples, and results are gathered in
the order given, so results and cache are the same as with one request at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
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
from darkmatter.interp.fuzzing import FuzzCounts, FuzzSummary, fuzz_items, summarize_fuzz
from darkmatter.interp.judges import BinaryJudge, EndpointJudge, Judge, Message
from darkmatter.interp.prompts import (
    PROMPT_VERSION,
    detection_messages,
    explanation_messages,
    fuzzing_messages,
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
    fuzzing: bool = False

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
        out = {**asdict(self), "prompt_version": PROMPT_VERSION}
        if not self.fuzzing:  # the keys of runs without fuzzing are those from before it existed
            del out["fuzzing"]
        return out


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


def _answers(asker: _Asker, msgs: list[Message], n: int, settings: _Settings) -> list[int] | None:
    """``n`` answers of 0/1 to a list prompt: constrained when the judge can, else parsed from free text."""
    answers = asker.detect(msgs, n) if isinstance(asker.judge, BinaryJudge) else None
    if answers is None:
        answers = asker.ask(
            msgs, settings.detect_max_tokens, partial(parse_detection, n=n), f"a list of {n} values 0/1"
        )
    return answers


def _fuzz(
    ex: LatentExamples, windows: list[Example], explanation: str, asker: _Asker, decode: Decode, s: _Settings
) -> FuzzCounts:
    """Fuzzing answers on ``windows`` marked at the latent's or at random tokens, in batches."""
    counts = FuzzCounts()
    items = fuzz_items(windows, s.seed, ex.latent)
    for i in range(0, len(items), s.batch_size):
        chunk = items[i : i + s.batch_size]
        msgs = fuzzing_messages(explanation, [(_decoded(decode, e.tokens), m) for e, m, _ in chunk])
        answers = _answers(asker, msgs, len(chunk), s)
        if answers is None:
            counts.failed_items += len(chunk)
            counts.failed_prompts += 1
            continue
        for (_, _, truth), a in zip(chunk, answers, strict=True):
            counts.record(truth, a)
    return counts


def _score_latent(
    ex: LatentExamples,
    asker: _Asker,
    decode: Decode,
    explain: list[Message],
    settings: _Settings,
    key: str,
) -> LatentInterp:
    """Ask for an explanation of ``ex``, then detection (and fuzzing) answers on its test set, in batches."""
    calls0 = asker.calls
    explanation = asker.ask(explain, settings.explain_max_tokens, parse_explanation, "an explanation")
    counts = DetectionCounts()
    tests = _test_set(ex, settings.seed, settings.n_per_decile, settings.n_negatives)
    for i in range(0, len(tests), settings.batch_size):
        chunk = tests[i : i + settings.batch_size]
        msgs = detection_messages(explanation or "", [_decoded(decode, e.tokens) for e, _ in chunk])
        answers = _answers(asker, msgs, len(chunk), settings)
        if answers is None:
            counts.failed_items += len(chunk)
            counts.failed_prompts += 1
            continue
        for (_, decile), a in zip(chunk, answers, strict=True):
            counts.record(decile, a)
    fuzz = None
    if settings.fuzzing:
        positives = [e for e, d in tests if d is not None]
        fuzz = _fuzz(ex, positives, explanation or "", asker, decode, settings)
    return LatentInterp(
        latent=ex.latent,
        explanation=explanation or "",
        explanation_parsed=explanation is not None,
        counts=counts,
        fuzzing=fuzz,
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


def _workers(judge: Judge, concurrency: int) -> int:
    """Threads for scoring: ``concurrency`` for an endpoint judge, one for any other (an in-process model)."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, found {concurrency}.")
    return concurrency if isinstance(judge, EndpointJudge) else 1


_Job = tuple[LatentExamples, list[Message], str]  # latent examples, explanation prompt, cache key


def _cached_and_jobs(
    todo: list[LatentExamples], cache: _Cache, desc: dict[str, Any], settings: _Settings, decode: Decode
) -> tuple[dict[int, LatentInterp], list[_Job]]:
    """The latents the cache already holds (by id), and the jobs for the others, in order."""
    done: dict[int, LatentInterp] = {}
    jobs: list[_Job] = []
    for ex in todo:
        top = ex.top[: settings.n_examples_explain]
        explain = explanation_messages([(_decoded(decode, e.tokens), e.acts) for e in top])
        key = _latent_key(ex, desc, settings.as_dict(), explain)
        hit = cache.hit(ex.latent, key)
        if hit is None:
            jobs.append((ex, explain, key))
        else:
            done[ex.latent] = hit
    return done, jobs


def _finished(jobs: Sequence[T], score: Callable[[T], LatentInterp], workers: int) -> Iterator[LatentInterp]:
    """Score ``jobs`` on ``workers`` threads, yielding each result as it finishes (in order with one).

    After a failure nothing new starts; the latents already being scored finish and are yielded (so they
    are cached), then the first failure is raised.
    """
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            yield score(job)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="autointerp")
    try:
        pending: set[Future[LatentInterp]] = {pool.submit(score, job) for job in jobs}
        error: BaseException | None = None
        while pending:
            finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in finished:
                if fut.cancelled():
                    continue
                exc = fut.exception()
                if exc is None:
                    yield fut.result()
                elif error is None:
                    error = exc
                    for other in pending:
                        other.cancel()
        if error is not None:
            raise error
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
    fuzzing: bool = False,
    concurrency: int = 1,
    cache_path: str | Path | None = None,
    progress: Progress | None = None,
) -> AutoInterpResult:
    """Explain and score every non-skipped latent of ``examples`` with ``judge``; see the module docstring.

    ``unparsable``: "raise" re-asks an unparsable reply ``reasks`` times and then raises EndpointError;
    "count" (after ``reasks`` re-asks) counts the prompt's items as failures. Defaults come from
    ``default_unparsable``.
    ``detect_max_tokens`` defaults to max(25, 6·batch_size) (the paper: 25 for 4 examples).
    ``fuzzing`` adds the fuzzing score (extra requests: one per ``batch_size`` decile samples).
    ``concurrency``: latents scored at a time by an endpoint judge (other judges score one at a time);
    it changes neither the results nor the cache.
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
        fuzzing=fuzzing,
    )
    policy, reasks = _answer_policy(judge, unparsable, reasks)
    desc = judge.describe()
    cache = _Cache(Path(cache_path) if cache_path is not None else None)
    todo = [ex for ex in examples.values() if ex.skip_reason is None]
    skipped = {ex.latent: str(ex.skip_reason) for ex in examples.values() if ex.skip_reason is not None}
    ticker = Ticker(progress, len(todo))
    done, jobs = _cached_and_jobs(todo, cache, desc, settings, decode)
    n_cached = len(done)
    if n_cached:
        ticker.advance(n_cached)

    def score(job: _Job) -> LatentInterp:
        ex, explain, key = job
        return _score_latent(ex, _Asker(judge, policy, reasks), decode, explain, settings, key)

    workers = _workers(judge, concurrency)
    try:
        for li in _finished(jobs, score, workers):
            cache.save(li)
            done[li.latent] = li
            ticker.advance(1)
    except EndpointError as exc:
        if cache.path is None:
            raise
        raise EndpointError(f"{exc} {cache.resume_hint(len(done), len(todo))}") from exc
    results = [done[ex.latent] for ex in todo]
    summary = summarize(r.counts for r in results)
    fuzz = summarize_fuzz(r.fuzzing for r in results if r.fuzzing is not None) if fuzzing else None
    return AutoInterpResult(
        judge=desc,
        weak_judge=bool(desc.get("weak", False)),
        notes=_notes(desc, summary, fuzz),
        settings={**settings.as_dict(), "unparsable": policy, "reasks": reasks},
        latents=results,
        skipped=skipped,
        summary=summary,
        fuzzing=fuzz,
        n_cached=n_cached,
    )


def _notes(desc: dict[str, Any], summary: DetectionSummary, fuzz: FuzzSummary | None) -> list[str]:
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
    if fuzz is not None and fuzz.counts.failed_items:
        notes.append(
            f"{fuzz.counts.failed_items} fuzzing window(s) in {fuzz.counts.failed_prompts} prompt(s) got no "
            "parsable answer and are excluded from the fuzzing accuracies."
        )
    return notes
