"""Auto-interp at scale: concurrent endpoint requests, the fuzzing scorer, per-latent JSON records."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from darkmatter.errors import EndpointError
from darkmatter.interp import (
    FuzzCounts,
    LatentExamples,
    LatentsFile,
    collect_examples,
    latent_records,
    run_autointerp,
    write_latent_records,
)
from darkmatter.interp.fuzzing import fuzz_items
from darkmatter.interp.prompts import DETECT_SYSTEM, EXPLAIN_SYSTEM, FUZZ_SYSTEM, highlight_mask
from darkmatter.store import ActivationStore, Batch
from test_interp import COLLECT, SITE, D, FakeEndpoint, completion, decode, make_store

N_LAT = 16
FAST = {"seed": 0, "n_examples_explain": 6, "n_per_decile": 1, "n_negatives": 2, "batch_size": 12}


def acts16(latents: list[int]) -> Callable[[Batch], torch.Tensor]:
    """Latent ``l`` fires on token ``l`` (the store's tokens are 0..19)."""

    def f(b: Batch) -> torch.Tensor:
        x = b.acts[SITE]
        return torch.stack([(b.token == lat).float() * (x[:, lat % D].abs() + 0.1) for lat in latents], 1)

    return f


@pytest.fixture(scope="module")
def examples16(tmp_path_factory: pytest.TempPathFactory) -> dict[int, LatentExamples]:
    store: ActivationStore = make_store(tmp_path_factory.mktemp("interp-store16"))
    lats = list(range(N_LAT))
    return collect_examples(store, acts16(lats), lats, **COLLECT)


def kind(messages: list[dict[str, str]]) -> str:
    systems = {EXPLAIN_SYSTEM: "explain", DETECT_SYSTEM: "detect", FUZZ_SYSTEM: "fuzz"}
    return systems.get(messages[0]["content"], "other")


def examples_in(prompt: str) -> list[str]:
    return re.findall(r"^Example \d+: (.*)$", prompt, flags=re.MULTILINE)


def oracle(body: dict[str, Any], n: int) -> tuple[int, Any]:
    """Explains by the most frequent marked word; detects it; calls a marking right when all marks are it."""
    prompt, k = body["messages"][-1]["content"], kind(body["messages"])
    if k == "explain":
        word = Counter(re.findall(r"<<\s*(\w+)", prompt)).most_common(1)[0][0]
        return completion(f"[EXPLANATION]: the word {word}")
    m = re.search(r"Feature explanation: the word (\w+)", prompt)
    word = m.group(1) if m else "none"
    if k == "detect":
        return completion(str([int(bool(re.search(rf"\b{word}\b", ex))) for ex in examples_in(prompt)]))
    answers = []
    for ex in examples_in(prompt):
        marked = [w for run in re.findall(r"<<(.*?)>>", ex) for w in run.split()]
        answers.append(int(bool(marked) and all(w == word for w in marked)))
    return completion(str(answers))


def random_judge(seed: int) -> Callable[[dict[str, Any], int], tuple[int, Any]]:
    rng = random.Random(seed)

    def respond(body: dict[str, Any], n: int) -> tuple[int, Any]:
        if kind(body["messages"]) == "explain":
            return completion("[EXPLANATION]: something")
        return completion(
            json.dumps([rng.randint(0, 1) for _ in examples_in(body["messages"][-1]["content"])])
        )

    return respond


def slow(respond: Callable, seconds: float) -> Callable[[dict[str, Any], int], tuple[int, Any]]:
    def f(body: dict[str, Any], n: int) -> tuple[int, Any]:
        time.sleep(seconds)
        return respond(body, n)

    return f


@pytest.fixture()
def endpoint() -> Iterator[Callable[..., FakeEndpoint]]:
    made: list[FakeEndpoint] = []

    def make(respond: Callable[[dict[str, Any], int], tuple[int, Any]]) -> FakeEndpoint:
        made.append(FakeEndpoint(respond))
        return made[-1]

    yield make
    for e in made:
        e.close()


# -- fuzzing ---------------------------------------------------------------------------------------
def test_fuzz_items_are_balanced_seeded_and_random_marks_avoid_active_tokens(examples16: dict) -> None:
    windows = [e for ex in examples16.values() for d in ex.deciles.values() for e in d][:40]
    items = fuzz_items(windows, 0, 3)
    assert items == fuzz_items(windows, 0, 3) and items != fuzz_items(windows, 1, 3)
    assert sum(t for *_, t in items) == 20
    for e, mask, truth in items:
        if truth:
            assert mask == highlight_mask(e.acts)
        else:
            assert any(mask) and all(a <= 0 for a, m in zip(e.acts, mask, strict=True) if m)
            assert sum(mask) == min(sum(highlight_mask(e.acts)), sum(a <= 0 for a in e.acts))


def test_fuzzing_oracle_scores_near_one_and_random_near_half(endpoint: Callable, examples16: dict) -> None:
    ep = endpoint(oracle)
    res = run_autointerp(examples16, ep.judge(), decode, fuzzing=True, concurrency=4, **FAST)
    f = res.fuzzing
    assert f is not None and f.n_latents == N_LAT and f.counts.failed_items == 0
    assert f.balanced_accuracy is not None and f.balanced_accuracy >= 0.95
    assert f.true_marks.total == f.random_marks.total == 5 * N_LAT  # 10 decile windows per latent, halved
    assert res.summary.balanced_accuracy == 1.0  # detection is unchanged beside it
    assert Counter(kind(r["messages"]) for r in ep.requests) == {
        "explain": N_LAT,
        "detect": N_LAT,
        "fuzz": N_LAT,
    }
    print(f"oracle fuzzing balanced accuracy {f.balanced_accuracy:.3f} [{f.balanced_ci_low:.3f}, "
          f"{f.balanced_ci_high:.3f}]")  # fmt: skip

    more = {**FAST, "n_per_decile": 3}
    rnd = run_autointerp(examples16, endpoint(random_judge(1)).judge(), decode, fuzzing=True, **more).fuzzing
    assert rnd is not None and rnd.balanced_accuracy is not None
    assert rnd.balanced_ci_low is not None and rnd.balanced_ci_high is not None
    # 480 windows: the balanced accuracy's 95% interval has a half-width of about 0.045
    assert rnd.counts.true_total + rnd.counts.random_total == 30 * N_LAT
    assert abs(rnd.balanced_accuracy - 0.5) < 0.1 and rnd.balanced_ci_low <= 0.5 <= rnd.balanced_ci_high
    print(f"random fuzzing balanced accuracy {rnd.balanced_accuracy:.3f} [{rnd.balanced_ci_low:.3f}, "
          f"{rnd.balanced_ci_high:.3f}]")  # fmt: skip


def test_fuzzing_off_asks_nothing_extra(endpoint: Callable, examples16: dict) -> None:
    ep = endpoint(oracle)
    one = {3: examples16[3]}
    res = run_autointerp(one, ep.judge(), decode, **FAST)
    assert res.fuzzing is None and res.latents[0].fuzzing is None and "fuzzing" not in res.settings
    n_off = len(ep.requests)
    on = run_autointerp(one, ep.judge(), decode, fuzzing=True, **FAST)
    assert len(ep.requests) - n_off == on.latents[0].n_judge_calls == n_off + 1  # one fuzzing prompt
    assert on.settings["fuzzing"] is True and on.latents[0].key != res.latents[0].key


def test_fuzz_counts_pool_by_summing() -> None:
    a = FuzzCounts(true_correct=3, true_total=4, random_correct=1, random_total=4)
    b = FuzzCounts(true_correct=1, true_total=1, random_correct=0, random_total=1, failed_items=2)
    assert (a + b).model_dump() == {"true_correct": 4, "true_total": 5, "random_correct": 1,
                                    "random_total": 5, "failed_items": 2, "failed_prompts": 0}  # fmt: skip


# -- concurrency -----------------------------------------------------------------------------------
def test_concurrent_requests_are_faster_with_identical_results(
    endpoint: Callable, examples16: dict, tmp_path: Path
) -> None:
    ep = endpoint(slow(oracle, 0.2))
    out: dict[int, tuple[float, str, bytes, bytes]] = {}
    for conc in (1, 8):
        cache, records = tmp_path / f"cache-{conc}.json", tmp_path / f"latents-{conc}.json"
        t0 = time.perf_counter()
        res = run_autointerp(
            examples16, ep.judge(), decode, fuzzing=True, concurrency=conc, cache_path=cache, **FAST
        )
        elapsed = time.perf_counter() - t0
        write_latent_records(records, latent_records(res, examples16, decode))
        out[conc] = (elapsed, res.model_dump_json(), cache.read_bytes(), records.read_bytes())
    (t1, *seq), (t8, *par) = out[1], out[8]
    print(f"16 latents, 0.2 s per request: sequential {t1:.2f} s, concurrency 8 {t8:.2f} s, "
          f"ratio {t8 / t1:.3f}")  # fmt: skip
    assert len(ep.requests) == 2 * 3 * N_LAT  # explain, detect, fuzz per latent, twice
    assert seq == par  # results, cache file and records byte for byte
    assert t8 < 0.3 * t1


def test_concurrent_run_resumes_after_endpoint_failure(
    endpoint: Callable, examples16: dict, tmp_path: Path
) -> None:
    state = {"n": 0}

    def flaky(body: dict[str, Any], n: int) -> tuple[int, Any]:
        state["n"] += 1
        if state["n"] > 20:
            return 503, {"error": "down"}
        time.sleep(0.02)
        return oracle(body, n)

    ep = endpoint(flaky)
    cache = tmp_path / "cache.json"
    with pytest.raises(EndpointError, match=r"latents are finished and saved"):
        run_autointerp(examples16, ep.judge(), decode, fuzzing=True, concurrency=8, cache_path=cache, **FAST)
    saved = sorted(map(int, json.loads(cache.read_text())["latents"]))
    assert 0 < len(saved) < N_LAT
    ep.respond = oracle
    res = run_autointerp(
        examples16, ep.judge(), decode, fuzzing=True, concurrency=8, cache_path=cache, **FAST
    )
    assert res.n_cached == len(saved)
    fresh = run_autointerp(examples16, endpoint(oracle).judge(), decode, fuzzing=True, **FAST)
    assert [li.model_dump() for li in res.latents] == [li.model_dump() for li in fresh.latents]
    assert res.fuzzing == fresh.fuzzing and res.summary == fresh.summary


# -- records ---------------------------------------------------------------------------------------
def test_latent_records_schema(endpoint: Callable, examples16: dict, tmp_path: Path) -> None:
    res = run_autointerp(examples16, endpoint(oracle).judge(), decode, fuzzing=True, **FAST)
    path = write_latent_records(tmp_path / "interp" / "latents-linear.json",
                                latent_records(res, examples16, decode, {"component": "linear"}))  # fmt: skip
    data = json.loads(path.read_text())
    assert data["format"] == "darkmatter-latents" and data["version"] == 1
    assert data["meta"] == {"component": "linear"} and data["judge"]["kind"] == "endpoint"
    back = LatentsFile.model_validate(data)
    assert [r.latent for r in back.latents] == list(range(N_LAT))
    rec = back.latents[5]
    assert rec.explanation == "the word w5" and rec.detection.balanced_accuracy == 1.0
    assert rec.fuzzing is not None and rec.fuzzing.positives.total + rec.fuzzing.negatives.total == 10
    assert len(rec.top_windows) == FAST["n_examples_explain"]
    w = rec.top_windows[0]
    assert w.tokens == decode(w.token_ids) and len(w.activations) == len(w.token_ids)
    assert w.max_activation == max(w.activations) > 0
    assert back.detection.balanced_accuracy == 1.0 and back.fuzzing is not None
    assert not list(path.parent.glob("*.tmp"))


KILLED_RUN = """
import json, sys
from darkmatter.interp import EndpointJudge, LatentExamples, run_autointerp
url, data, cache, fast = sys.argv[1:5]
examples = {int(k): LatentExamples.model_validate(v) for k, v in json.loads(open(data).read()).items()}
run_autointerp(examples, EndpointJudge(url, "fake-model", retries=0), lambda ids: [f" w{i}" for i in ids],
               fuzzing=True, concurrency=8, cache_path=cache, **json.loads(fast))
"""


def test_killed_concurrent_run_resumes_from_its_cache(
    endpoint: Callable, examples16: dict, tmp_path: Path
) -> None:
    ep = endpoint(slow(oracle, 0.05))
    data, cache = tmp_path / "examples.json", tmp_path / "cache.json"
    data.write_text(json.dumps({k: v.model_dump(mode="json") for k, v in examples16.items()}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    args = [sys.executable, "-c", KILLED_RUN, ep.url, str(data), str(cache), json.dumps(FAST)]
    child = subprocess.Popen(args, env=env)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if cache.is_file() and len(json.loads(cache.read_text())["latents"]) >= 4:
                break
            time.sleep(0.01)
        assert child.poll() is None, "the run finished before it could be killed"
    finally:
        child.kill()
        child.wait()
    saved = json.loads(cache.read_text())["latents"]  # a complete file: written atomically
    assert 4 <= len(saved) < N_LAT
    asked = len(ep.requests)
    res = run_autointerp(
        examples16, ep.judge(), decode, fuzzing=True, concurrency=8, cache_path=cache, **FAST
    )
    assert res.n_cached == len(saved) and len(ep.requests) - asked == 3 * (N_LAT - len(saved))
    fresh = run_autointerp(examples16, endpoint(oracle).judge(), decode, fuzzing=True, **FAST)
    assert res.model_dump(exclude={"n_cached", "judge"}) == fresh.model_dump(exclude={"n_cached", "judge"})
