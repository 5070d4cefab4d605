"""Auto-interpretability: example collection, judges over a fake local endpoint, parsing, scoring, resume."""

from __future__ import annotations

import json
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from darkmatter.errors import ConfigError, DataError, EndpointError
from darkmatter.interp import (
    DetectionCounts,
    EndpointJudge,
    LatentExamples,
    LocalJudge,
    Proportion,
    collect_examples,
    parse_detection,
    parse_explanation,
    render,
    run_autointerp,
    summarize,
    wilson_interval,
)
from darkmatter.interp.prompts import DETECT_SYSTEM, EXPLAIN_SYSTEM
from darkmatter.sae import SAE, SAEConfig
from darkmatter.store import ActivationStore, Batch
from darkmatter.study.steps import autointerp as autointerp_step

from conftest import tiny_model, tiny_tokenizer

SITE = "blocks.0.hook_resid_post"
D, VOCAB, N_CTX, CTX_LEN, SKIP, WINDOW = 4, 20, 60, 32, 2, 8
D_SAE = 16
TRIGGERS = {3: 5, 7: 9, 11: 13, 12: 2, 15: 99}  # latent -> the token it fires on (99 never occurs)
SCORED = [3, 7, 11, 12]


# -- a small store whose latents fire on one token each --------------------------------------------
def make_store(path: Path) -> ActivationStore:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, size=(N_CTX, CTX_LEN)).astype(np.int32)
    identity = {
        "model": {"name": "synthetic", "model_type": "none", "n_layers": 0, "d_model": 0},
        "sites": [SITE],
        "d": {SITE: D},
        "dtype": "fp32",
        "ctx_len": CTX_LEN,
        "n_contexts": N_CTX,
        "tokens_fingerprint": "interp-test",
        "has_bos": False,
        "skip_positions": SKIP,
        "text_source": "synthetic",
        "with_loss": False,
        "shard_contexts": 16,
        "batch_size": 1,
    }
    store = ActivationStore.create_or_resume(path, identity, tokens)
    g = torch.Generator().manual_seed(0)
    for i in range(store.n_shards):
        a, b = store.shard_range(i)
        store.write_shard(i, {SITE: torch.randn(b - a, CTX_LEN, D, generator=g)})
    return store


def acts_fn(latents: list[int]) -> Callable[[Batch], torch.Tensor]:
    def f(b: Batch) -> torch.Tensor:
        x = b.acts[SITE]
        cols = [(b.token == TRIGGERS[lat]).float() * (x[:, lat % D].abs() + 0.1) for lat in latents]
        return torch.stack(cols, dim=1)

    return f


def decode(ids: list[int]) -> list[str]:
    return [f" w{i}" for i in ids]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ActivationStore:
    return make_store(tmp_path_factory.mktemp("interp-store"))


COLLECT = {"d_sae": D_SAE, "n_top": 10, "n_per_decile": 5, "n_negatives": 5, "window": WINDOW,
           "max_examples": 200, "min_activations": 20, "seed": 0}  # fmt: skip


@pytest.fixture(scope="module")
def examples(store: ActivationStore) -> dict[int, LatentExamples]:
    lats = [*SCORED, 15]
    return collect_examples(store, acts_fn(lats), lats, **COLLECT)


def brute_acts(store: ActivationStore, latent: int) -> np.ndarray:
    """``[n_ctx, ctx_len]`` activations of one latent, computed directly (zeros before SKIP)."""
    out = np.zeros((N_CTX, CTX_LEN), dtype=np.float32)
    for b in store.iter_batches(batch_tokens=100_000):
        out[b.context.numpy(), b.position.numpy()] = acts_fn([latent])(b)[:, 0].numpy()
    return out


# -- a fake OpenAI-compatible endpoint -------------------------------------------------------------
Respond = Callable[[dict[str, Any], int], tuple[int, Any]]


def completion(text: str) -> tuple[int, Any]:
    return 200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}


class FakeEndpoint:
    """``http.server`` on 127.0.0.1 answering ``POST /v1/chat/completions`` with ``respond(body, n)``."""

    def __init__(self, respond: Respond) -> None:
        self.respond = respond
        self.requests: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.auth.append(self.headers.get("Authorization"))
                if self.path != "/v1/chat/completions":
                    status, payload = 404, {"error": "not found"}
                else:
                    status, payload = outer.respond(body, len(outer.requests))
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def judge(self, **kw: Any) -> EndpointJudge:
        return EndpointJudge(self.url, "fake-model", **{"retries": 0, "backoff": 0.0, **kw})

    def kinds(self) -> Counter[str]:
        return Counter(_kind(r["messages"]) for r in self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def endpoint() -> Iterator[Callable[[Respond], FakeEndpoint]]:
    made: list[FakeEndpoint] = []

    def make(respond: Respond) -> FakeEndpoint:
        made.append(FakeEndpoint(respond))
        return made[-1]

    yield make
    for e in made:
        e.close()


def _kind(messages: list[dict[str, str]]) -> str:
    return {EXPLAIN_SYSTEM: "explain", DETECT_SYSTEM: "detect"}.get(messages[0]["content"], "other")


def _examples_in(prompt: str) -> list[str]:
    return re.findall(r"^Example \d+: (.*)$", prompt, flags=re.MULTILINE)


def oracle(body: dict[str, Any], n: int) -> tuple[int, Any]:
    """Explains by the most frequent highlighted word; detects by looking for that word."""
    prompt = body["messages"][-1]["content"]
    if _kind(body["messages"]) == "explain":
        word = Counter(re.findall(r"<<\s*(\w+)", prompt)).most_common(1)[0][0]
        return completion(f"[EXPLANATION]: the word {word}")
    m = re.search(r"Feature explanation: the word (\w+)", prompt)
    word = m.group(1) if m else "none"
    return completion(str([int(bool(re.search(rf"\b{word}\b", ex))) for ex in _examples_in(prompt)]))


def random_answers(seed: int) -> Respond:
    rng = random.Random(seed)

    def respond(body: dict[str, Any], n: int) -> tuple[int, Any]:
        prompt = body["messages"][-1]["content"]
        if _kind(body["messages"]) == "explain":
            return completion("[EXPLANATION]: something")
        return completion(json.dumps([rng.randint(0, 1) for _ in _examples_in(prompt)]))

    return respond


RUN = {"seed": 0, "n_examples_explain": 10, "n_per_decile": 5, "n_negatives": 5, "batch_size": 4}


# -- example collection ----------------------------------------------------------------------------
def test_top_examples_are_the_max_activation_windows(store: ActivationStore, examples: dict) -> None:
    toks = store.tokens
    for lat in SCORED:
        brute = brute_acts(store, lat)
        wins = [(c, s) for c in range(N_CTX) for s in range(SKIP, CTX_LEN, WINDOW)]
        wmax = sorted((float(brute[c, s : s + WINDOW].max()) for c, s in wins), reverse=True)
        ex = examples[lat]
        assert ex.skip_reason is None
        assert ex.n_active_tokens == int((brute > 0).sum())
        assert ex.n_active_windows == sum(v > 0 for v in wmax)
        assert [e.max_act for e in ex.top] == pytest.approx(wmax[:10])
        for e in ex.top:
            assert e.start >= SKIP and (e.start - SKIP) % WINDOW == 0
            assert e.tokens == toks[e.context, e.start : e.start + len(e.tokens)].tolist()
            assert e.acts == pytest.approx(brute[e.context, e.start : e.start + len(e.tokens)].tolist())
            assert len(e.tokens) == min(WINDOW, CTX_LEN - e.start)
    # the grid's last window of each context is the short one (30 streamed positions, windows of 8)
    assert any(len(e.tokens) == 6 for lat in SCORED for d in examples[lat].deciles.values() for e in d)


def test_deciles_are_ordered_and_negatives_never_fire(store: ActivationStore, examples: dict) -> None:
    for lat in SCORED:
        brute = brute_acts(store, lat)
        ex = examples[lat]
        assert sorted(ex.deciles) == list(range(1, 11))
        for d in range(1, 11):
            assert 1 <= len(ex.deciles[d]) <= 5
            assert all(e.decile == d and e.max_act > 0 for e in ex.deciles[d])
        for lo, hi in zip(range(1, 10), range(2, 11), strict=True):
            assert max(e.max_act for e in ex.deciles[lo]) <= min(e.max_act for e in ex.deciles[hi])
        quiet = [c for c in range(N_CTX) if brute[c].max() == 0]
        assert len(ex.negatives) == min(5, len(quiet)) and len(quiet) > 5
        for e in ex.negatives:
            assert e.context in quiet and e.max_act == 0 and set(e.acts) == {0.0}
            assert TRIGGERS[lat] not in e.tokens


def test_collection_is_independent_of_batch_size(store: ActivationStore, examples: dict) -> None:
    lats = [*SCORED, 15]
    small = collect_examples(store, acts_fn(lats), lats, **{**COLLECT, "batch_tokens": 7})
    assert {k: v.model_dump() for k, v in small.items()} == {k: v.model_dump() for k, v in examples.items()}


def test_rare_latent_is_skipped_with_reason(examples: dict) -> None:
    assert examples[15].n_active_tokens == 0
    assert "min_activations=20" in str(examples[15].skip_reason)


def test_collection_validates_latents_and_activations(store: ActivationStore) -> None:
    with pytest.raises(ConfigError, match=r"outside the SAE \(16, 40\).*the SAE has 16 latents"):
        collect_examples(store, acts_fn([3]), [3, 16, 40], d_sae=16)
    with pytest.raises(ConfigError, match="duplicates"):
        collect_examples(store, acts_fn([3]), [3, 3], d_sae=16)
    with pytest.raises(DataError, match=r"shape \(\d+, 1\), expected \[\d+, 2\]"):
        collect_examples(store, acts_fn([3]), [3, 7], d_sae=16)


def test_sae_latent_columns_match_the_dense_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split SAE's own latents are read from its sparse codes, in the order asked, chunked or not."""
    g = torch.Generator().manual_seed(0)
    cfg = SAEConfig(d_in=8, d_sae=24, activation="topk", k=3, hook_site="blocks.0.hook_resid_post")
    tensors = {"W_enc": torch.randn(8, 24, generator=g), "b_enc": torch.zeros(24)}
    sae = SAE.from_tensors(
        cfg, {**tensors, "W_dec": torch.randn(24, 8, generator=g), "b_dec": torch.zeros(8)}
    )
    x = torch.randn(40, 8, generator=g)
    n = len(x)
    zeros = torch.zeros(n, dtype=torch.long)
    batch = Batch(acts={cfg.hook_site: x}, context=zeros, position=torch.arange(n), token=zeros, loss=None)
    dense = sae.encode(x)
    latents = [int(i) for i in dense.count_nonzero(0).argsort(descending=True)[:4]][::-1]
    for chunk_elements in (1 << 26, 24 * 7):  # one block, and blocks of 7 tokens
        monkeypatch.setattr(autointerp_step, "PRE_ACTIVATION_ELEMENTS", chunk_elements)
        got = autointerp_step.sae_activations_fn(sae, latents)(batch)
        assert got.shape == (n, 4) and got.dtype == torch.float32
        torch.testing.assert_close(got, dense[:, latents])
        assert bool((got > 0).any(0).all())  # every chosen latent fires somewhere: not vacuous


# -- parsing and prompts ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("[1, 0, 1]", [1, 0, 1]),
        ('Sure! ["1", "0", "1"]', [1, 0, 1]),
        ("[true, false, true]", [1, 0, 1]),
        ("1 0 1", [1, 0, 1]),
        ("1,0,1", [1, 0, 1]),
        ("`101`", [1, 0, 1]),
        ("1. yes\n2. no\n3. yes", [1, 0, 1]),
        ("Example 1: Yes, animals.\nExample 2: No\nExample 3: yes", [1, 0, 1]),
        ("1.\n0.\n1.", [1, 0, 1]),
        ("[1, 0]", None),  # wrong length
        ("[1, 0, 1, 1]", None),
        ("No idea, sorry", None),
        ("", None),
        ("The first and third.", None),
    ],
)
def test_parse_detection(reply: str, expected: list[int] | None) -> None:
    assert parse_detection(reply, 3) == expected


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("[EXPLANATION]: the word bank\nMore text", "the word bank"),
        ("Let me think.\n[EXPLANATION]:\n  mentions of rivers", "mentions of rivers"),
        ("Explanation: 'verbs in past tense'", "verbs in past tense"),
        ("\n\n  numbers and dates  \nsecond line", "numbers and dates"),
        ("   \n", None),
    ],
)
def test_parse_explanation(reply: str, expected: str | None) -> None:
    assert parse_explanation(reply) == expected


def test_render_highlights_above_six_tenths_of_max() -> None:
    toks = [" the", " cat", " sat", " on", "\n"]
    assert render(toks, [0.0, 1.0, 0.61, 0.6, 0.0]) == " the <<cat sat>> on\\n"
    assert render(toks) == " the cat sat on\\n"


# -- scoring ---------------------------------------------------------------------------------------
def test_wilson_interval_known_values() -> None:
    assert wilson_interval(8, 10) == pytest.approx((0.4901625, 0.9433178), abs=1e-6)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775328), abs=1e-6)
    assert wilson_interval(50, 100) == pytest.approx((0.4038315, 0.5961685), abs=1e-6)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    p = Proportion.of("Q1", 8, 10)
    assert p.accuracy == 0.8 and p.wald_half_width == pytest.approx(1.959964 * (0.16 / 10) ** 0.5)


def test_summary_pools_counts_by_summing() -> None:
    a, b = DetectionCounts(), DetectionCounts()
    for _ in range(3):
        a.record(10, 1)
    a.record(1, 0)
    b.record(10, 0)
    b.record(None, 0)
    b.record(None, 1)
    s = summarize([a, b])
    assert s.n_latents == 2
    assert (s.deciles[9].correct, s.deciles[9].total) == (3, 4)  # Q10 = highest decile, pooled
    assert (s.deciles[0].correct, s.deciles[0].total) == (0, 1)
    assert (s.negatives.correct, s.negatives.total) == (1, 2)
    assert s.balanced_accuracy == pytest.approx((3 / 5 + 1 / 2) / 2)
    # MOVER with equal proportions and sizes: mean - (p - lower) / sqrt(2)
    c = DetectionCounts(decile_correct=[0] * 9 + [8], decile_total=[0] * 9 + [10], negative_correct=8,
                        negative_total=10)  # fmt: skip
    s2 = summarize([c])
    assert s2.balanced_ci_low == pytest.approx(0.8 - (0.8 - 0.4901625) / 2**0.5, abs=1e-6)


# -- judges over HTTP ------------------------------------------------------------------------------
def test_oracle_endpoint_scores_near_one(endpoint: Callable, examples: dict) -> None:
    ep = endpoint(oracle)
    judge = ep.judge(api_key="sk-test")
    seen: list[tuple[int, int, float]] = []
    res = run_autointerp(examples, judge, decode, progress=lambda *a: seen.append(a), **RUN)
    assert [(done, total) for done, total, _ in seen] == [(i + 1, len(SCORED)) for i in range(len(SCORED))]
    assert all(rate > 0 for *_, rate in seen)  # latents per second
    assert [li.explanation for li in res.latents] == [f"the word w{TRIGGERS[lat]}" for lat in SCORED]
    assert all(p.accuracy == 1.0 and p.total > 0 for p in res.summary.deciles)
    assert res.summary.negatives.accuracy == 1.0 and res.summary.negatives.total == 5 * len(SCORED)
    assert res.summary.balanced_accuracy == 1.0 and res.summary.counts.failed_items == 0
    assert res.skipped == {15: examples[15].skip_reason}
    assert not res.weak_judge and res.judge["kind"] == "endpoint"
    first = ep.requests[0]
    assert first["model"] == "fake-model" and first["temperature"] == 0 and first["max_tokens"] == 50
    assert set(ep.auth) == {"Bearer sk-test"}
    assert ep.kinds()["explain"] == len(SCORED)


def test_random_endpoint_scores_near_half(endpoint: Callable, examples: dict) -> None:
    res = run_autointerp(examples, endpoint(random_answers(1)).judge(), decode, **RUN)
    s = res.summary
    for p in (s.positives, s.negatives):
        assert p.ci_low is not None and p.ci_high is not None and p.ci_low <= 0.5 <= p.ci_high
    assert s.balanced_accuracy is not None and abs(s.balanced_accuracy - 0.5) < 0.2
    assert s.balanced_ci_low is not None and s.balanced_ci_high is not None
    assert s.balanced_ci_low <= 0.5 <= s.balanced_ci_high


def test_malformed_json_is_retried_then_fails_in_one_line(endpoint: Callable) -> None:
    ep = endpoint(lambda body, n: (200, b"<html>oops</html>"))
    with pytest.raises(EndpointError) as info:
        ep.judge(retries=2).chat([{"role": "user", "content": "hi"}], max_tokens=5)
    assert len(ep.requests) == 3
    msg = str(info.value)
    assert "\n" not in msg and ep.url in msg and "3 attempt(s)" in msg and "not a chat completion" in msg


def test_garbage_answers_are_reasked_then_raise(endpoint: Callable, examples: dict) -> None:
    def respond(body: dict[str, Any], n: int) -> tuple[int, Any]:
        if _kind(body["messages"]) == "explain":
            return completion("[EXPLANATION]: a word")
        return completion("I am not sure\nwhat you mean.")

    ep = endpoint(respond)
    with pytest.raises(EndpointError) as info:
        run_autointerp(examples, ep.judge(retries=2), decode, **RUN)
    assert ep.kinds() == Counter({"explain": 1, "detect": 3})
    msg = str(info.value)
    assert "\n" not in msg and "not a list of 4 values 0/1" in msg and "I am not sure what you mean." in msg


def test_garbage_answers_counted_when_asked(endpoint: Callable, examples: dict) -> None:
    ep = endpoint(lambda body, n: completion("no idea"))
    res = run_autointerp({3: examples[3]}, ep.judge(retries=2), decode, unparsable="count", reasks=0, **RUN)
    c = res.summary.counts
    n_items = sum(min(5, len(d)) for d in examples[3].deciles.values()) + len(examples[3].negatives)
    n_prompts = -(-n_items // 4)
    assert c.failed_items == n_items and c.failed_prompts == n_prompts
    assert sum(c.decile_total) + c.negative_total == 0
    assert len(ep.requests) == 1 + n_prompts and res.settings["unparsable"] == "count"
    assert any("no parsable answer" in n for n in res.notes)


def test_endpoint_down_fails_after_retries_with_backoff() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits: list[float] = []
    judge = EndpointJudge(f"http://127.0.0.1:{port}/v1", "m", retries=2, backoff=0.01, sleep=waits.append)
    with pytest.raises(EndpointError) as info:
        judge.chat([{"role": "user", "content": "hi"}], max_tokens=5)
    msg = str(info.value)
    assert waits == [0.01, 0.02]
    assert "\n" not in msg and f"127.0.0.1:{port}/v1/chat/completions" in msg and "cannot connect" in msg


def test_server_error_then_success(endpoint: Callable) -> None:
    ep = endpoint(lambda body, n: (500, {"error": "busy"}) if n == 1 else completion("hello"))
    waits: list[float] = []
    assert ep.judge(retries=1, backoff=0.5, sleep=waits.append).chat([], max_tokens=5) == "hello"
    assert len(ep.requests) == 2 and waits == [0.5]


def test_client_error_fails_at_once(endpoint: Callable) -> None:
    ep = endpoint(lambda body, n: (401, {"error": "bad key"}))
    with pytest.raises(EndpointError, match=r"HTTP 401.*API key"):
        ep.judge(retries=3).chat([], max_tokens=5)
    assert len(ep.requests) == 1


def test_timeout_is_retried(endpoint: Callable) -> None:
    def slow_first(body: dict[str, Any], n: int) -> tuple[int, Any]:
        if n == 1:
            time.sleep(0.6)
        return completion("late but fine")

    ep = endpoint(slow_first)
    assert ep.judge(retries=1, timeout=0.2).chat([], max_tokens=5) == "late but fine"
    assert len(ep.requests) == 2


def test_bad_base_url_is_config_error() -> None:
    with pytest.raises(ConfigError, match="not an http"):
        EndpointJudge("localhost:8000", "m")


# -- cache and resume ------------------------------------------------------------------------------
def test_interrupted_run_resumes_from_cache(endpoint: Callable, examples: dict, tmp_path: Path) -> None:
    state = {"down": False}

    def flaky(body: dict[str, Any], n: int) -> tuple[int, Any]:
        if _kind(body["messages"]) == "explain" and ep.kinds()["explain"] == 3:
            state["down"] = True
        return (503, {"error": "down"}) if state["down"] else oracle(body, n)

    ep = endpoint(flaky)
    cache = tmp_path / "autointerp.json"
    with pytest.raises(EndpointError, match=r"2 of 4 latents are finished and saved"):
        run_autointerp(examples, ep.judge(retries=1), decode, cache_path=cache, **RUN)
    saved = json.loads(cache.read_text())["latents"]
    assert sorted(map(int, saved)) == SCORED[:2]

    state["down"] = False
    ep.requests.clear()
    ep.respond = oracle
    res = run_autointerp(examples, ep.judge(retries=1), decode, cache_path=cache, **RUN)
    assert res.n_cached == 2 and ep.kinds()["explain"] == 2  # only the two unfinished latents were asked
    fresh = run_autointerp(examples, endpoint(oracle).judge(), decode, **RUN)
    assert [li.model_dump() for li in res.latents] == [li.model_dump() for li in fresh.latents]

    ep.requests.clear()
    again = run_autointerp(examples, ep.judge(), decode, cache_path=cache, **RUN)
    assert again.n_cached == 4 and ep.requests == []
    changed = run_autointerp(examples, ep.judge(), decode, cache_path=cache, **{**RUN, "n_negatives": 4})
    assert changed.n_cached == 0 and ep.kinds()["explain"] == 4


# -- in-process judge ------------------------------------------------------------------------------
def test_local_judge_runs_and_counts_failures(examples: dict) -> None:
    tok = tiny_tokenizer()
    judge = LocalJudge(tiny_model("llama"), tok)
    out = judge.chat([{"role": "user", "content": "Say hi."}], max_tokens=4)
    assert isinstance(out, str)
    assert judge.describe()["kind"] == "local" and judge.weak

    def tiny_decode(ids: list[int]) -> list[str]:
        return [str(t) for t in tok.convert_ids_to_tokens(ids)]

    one = {3: examples[3]}
    res = run_autointerp(one, judge, tiny_decode, seed=0, n_examples_explain=2, n_per_decile=1, n_negatives=2,
                         batch_size=4, explain_max_tokens=4, detect_max_tokens=4)  # fmt: skip
    c = res.summary.counts
    assert sum(c.decile_total) + c.negative_total + c.failed_items == 10 + 2
    assert res.weak_judge and res.settings["unparsable"] == "count" and "small model" in res.notes[0]
    assert judge.n_truncated > 0  # the character-level prompt is longer than the tiny model's 256 positions


def test_local_judge_constrained_detection_matches_full_forwards() -> None:
    tok = tiny_tokenizer()
    judge = LocalJudge(tiny_model("llama", seed=3), tok, max_context=10_000)
    msgs = [{"role": "user", "content": "Feature: dogs\n\nExample 1: a dog\n\nExample 2: a cat"}]
    answers = judge.detect(msgs, 5)
    assert answers is not None and len(answers) == 5 and set(answers) <= {0, 1}
    # the same decisions from full forward passes over the growing answer text (no KV cache)
    zero, one = (
        tok("0", add_special_tokens=False).input_ids[0],
        tok("1", add_special_tokens=False).input_ids[0],
    )
    ids = torch.cat([judge._prompt_ids(msgs), judge._piece("[")], 1)
    want = []
    for i in range(5):
        with torch.no_grad():
            logits = judge.model(input_ids=ids).logits[0, -1]
        want.append(int(logits[one] > logits[zero]))
        ids = torch.cat([ids, judge._piece(f"{want[-1]}{', ' if i < 4 else ']'}")], 1)
    assert answers == want
    assert LocalJudge(judge.model, tok, constrained=False).detect(msgs, 5) is None


def test_constrained_local_judge_leaves_no_item_unparsed(examples: dict) -> None:
    tok = tiny_tokenizer()

    def tiny_decode(ids: list[int]) -> list[str]:
        return [str(t) for t in tok.convert_ids_to_tokens(ids)]

    kw: dict = {"seed": 0, "n_examples_explain": 2, "n_per_decile": 1, "n_negatives": 2, "batch_size": 4,
                "explain_max_tokens": 4, "detect_max_tokens": 4}  # fmt: skip
    one = {3: examples[3]}
    constrained = run_autointerp(one, LocalJudge(tiny_model("llama"), tok), tiny_decode, **kw)
    free = run_autointerp(one, LocalJudge(tiny_model("llama"), tok, constrained=False), tiny_decode, **kw)
    assert constrained.summary.counts.failed_items == 0
    assert sum(constrained.summary.counts.decile_total) + constrained.summary.counts.negative_total == 12
    assert free.summary.counts.failed_items > 0  # a random tiny model never writes a 0/1 list by itself
