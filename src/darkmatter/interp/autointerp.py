"""Explain each latent from its top examples, then score the explanation by detection (paper §6.4).

Per latent: the explanation prompt shows the top ``n_examples_explain`` windows; the test set is
``n_per_decile`` windows sampled from each activation decile plus ``n_negatives`` never-firing windows,
shuffled with a seeded RNG and sent ``batch_size`` per detection prompt. Unparsable answers are the paper's
-1: excluded from the counts and tallied as failures. With ``fuzzing`` the decile samples are also shown
with marked tokens (see ``darkmatter.interp.fuzzing``), ``batch_size`` per prompt: up to
ceil(10·n_per_decile / batch_size) extra requests per latent. Every finished latent is saved to
``cache_path`` at once (see ``darkmatter.interp.cache``), so a killed or failed run resumes without asking
the judge again for them.

An endpoint judge scores up to ``concurrency`` latents at a time (threads; each latent's requests stay in
order). Every latent's prompts depend only on the seed and its own examples, and results are gathered in
the order given, so results and cache are the same as with one request at a time. Under ``torchrun``
(``ranks``) the latents are dealt to the ranks in contiguous shares and gathered back in the order given,
so every rank returns the result of one process; a latent's prompts and answers depend on nothing the
other latents of its rank do (a local judge answers one prompt at a time, unpadded).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from darkmatter.errors import ConfigError, EndpointError
from darkmatter.hashing import stable_hash
from darkmatter.interp.cache import LatentCache
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
from darkmatter.interp.results import AutoInterpResult, LatentInterp
from darkmatter.interp.scoring import N_DECILES, DetectionCounts, DetectionSummary, summarize
from darkmatter.progress import Progress, Ticker
from darkmatter.ranks import SINGLE, Ranks

Decode = Callable[[list[int]], list[str]]  # token ids -> one string per token
Unparsable = Literal["raise", "count"]
T = TypeVar("T")


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


def _workers(judge: Judge, concurrency: int) -> int:
    """Threads for scoring: ``concurrency`` for an endpoint judge, one for any other (an in-process model)."""
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, found {concurrency}.")
    return concurrency if isinstance(judge, EndpointJudge) else 1


_Job = tuple[LatentExamples, list[Message], str]  # latent examples, explanation prompt, cache key


def _cached_and_jobs(
    todo: list[LatentExamples], cache: LatentCache, desc: dict[str, Any], settings: _Settings, decode: Decode
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
    ranks: Ranks = SINGLE,
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
    ``ranks``: under ``torchrun`` the latents left are dealt in contiguous shares; every rank returns the
    whole result (``_meet``); ``examples``, ``judge`` and ``decode`` must be the same on every rank.
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
    cache = LatentCache(Path(cache_path) if cache_path is not None else None, rank=ranks.rank)
    todo = [ex for ex in examples.values() if ex.skip_reason is None]
    skipped = {ex.latent: str(ex.skip_reason) for ex in examples.values() if ex.skip_reason is not None}
    done, jobs = _cached_and_jobs(todo, cache, desc, settings, decode)
    if ranks.active:  # rank 0's cache decides what is left; each rank scores a contiguous share of it
        done = ranks.broadcast(done)
        jobs = ranks.share([job for job in jobs if job[0].latent not in done])
    n_cached = len(done)
    ticker = Ticker(progress, n_cached + len(jobs))
    if n_cached:
        ticker.advance(n_cached)

    def score(job: _Job) -> LatentInterp:
        ex, explain, key = job
        return _score_latent(ex, _Asker(judge, policy, reasks), decode, explain, settings, key)

    fresh, failure = _score_jobs(
        jobs, score, _workers(judge, concurrency), cache, done, ticker, ranks, len(todo)
    )
    if ranks.active:
        _meet(ranks, cache, done, fresh, failure, len(todo))
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


def _score_jobs(
    jobs: list[_Job],
    score: Callable[[_Job], LatentInterp],
    workers: int,
    cache: LatentCache,
    done: dict[int, LatentInterp],
    ticker: Ticker,
    ranks: Ranks,
    n_todo: int,
) -> tuple[list[LatentInterp], EndpointError | None]:
    """Score ``jobs``, caching and recording each finished latent in ``done``; the latents scored here and,
    under ``torchrun``, the endpoint error that stopped this rank (alone, the error is raised with a hint)."""
    fresh: list[LatentInterp] = []
    try:
        for li in _finished(jobs, score, workers):
            cache.save(li)
            done[li.latent] = li
            fresh.append(li)
            ticker.advance(1)
    except EndpointError as exc:
        if not ranks.active:
            if cache.path is None:
                raise
            raise EndpointError(f"{exc} {cache.resume_hint(len(done), n_todo)}") from exc
        return fresh, exc
    return fresh, None


def _meet(
    ranks: Ranks,
    cache: LatentCache,
    done: dict[int, LatentInterp],
    fresh: list[LatentInterp],
    failure: EndpointError | None,
    total: int,
) -> None:
    """Every rank's newly scored latents into ``done`` (and into rank 0's cache, which then drops the part
    files). A judge failure on any rank is raised on every rank, the first in rank order, so all ranks
    leave together and the latents finished anywhere are kept."""
    met = ranks.gather((fresh, None if failure is None else str(failure)))
    for latents, _ in met:
        for li in latents:
            done[li.latent] = li
    cache.absorb(li for latents, _ in met for li in latents)
    errors = [error for _, error in met if error is not None]
    if errors:
        hint = "" if cache.main is None else f" {cache.resume_hint(len(done), total)}"
        raise EndpointError(errors[0] + hint) from failure


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
