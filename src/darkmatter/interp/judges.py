"""Judges: an OpenAI-compatible chat endpoint (with retries) or an in-process transformers causal LM."""

from __future__ import annotations

import http.client
import inspect
import ipaddress
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

from darkmatter.errors import ConfigError, EndpointError
from darkmatter.lm.loading import LoadedLM

Message = dict[str, str]
API_KEY_ENV = "DARKMATTER_JUDGE_API_KEY"
# Below this many parameters an in-process judge is flagged weak (the paper's judge had 70B).
WEAK_JUDGE_PARAMS = 3_000_000_000
RETRY_STATUS = {408, 425, 429}  # and every 5xx


@runtime_checkable
class Judge(Protocol):
    """Anything that answers chat messages greedily and can say what it is."""

    def chat(self, messages: list[Message], *, max_tokens: int) -> str:
        """The assistant's reply to ``messages`` (temperature 0), at most ``max_tokens`` tokens."""
        ...

    def describe(self) -> dict[str, Any]:
        """At least ``kind``, ``model`` and ``weak`` (bool), for results and cache keys."""
        ...


@runtime_checkable
class BinaryJudge(Judge, Protocol):
    """A judge that can answer a detection prompt in the required format by construction."""

    def detect(self, messages: list[Message], n: int) -> list[int] | None:
        """``n`` answers of 0/1 to a detection prompt, or None when it cannot constrain its answer."""
        ...


def _one_line(text: str, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _RetryableError(Exception):
    """A failure worth another attempt; ``delay`` overrides the backoff when the server asked for one."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class EndpointJudge:
    """An OpenAI-compatible ``POST {base_url}/chat/completions`` endpoint (vLLM, llama.cpp, hosted APIs).

    Connection errors, timeouts, HTTP 408/425/429 and 5xx, and replies that are not chat completions are
    retried ``retries`` times, waiting ``backoff·2^attempt`` seconds (at most ``max_backoff``; a numeric
    Retry-After is honoured up to that cap); then an EndpointError names the URL and the last failure.
    Other HTTP errors (wrong URL, model or key) fail at once. ``api_key`` defaults to the environment
    variable ``DARKMATTER_JUDGE_API_KEY``; loopback URLs bypass any proxy settings.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        weak: bool = False,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        parsed = urllib.parse.urlparse(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError(
                f"Judge base URL {base_url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:8000/v1."
            )
        if retries < 0 or timeout <= 0 or backoff < 0:
            raise ConfigError(
                f"Judge retries must be >= 0, timeout > 0 and backoff >= 0; found {retries}, {timeout}, "
                f"{backoff}."
            )
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.model = model
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.weak = weak
        self._sleep = sleep
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(parsed.hostname) else []
        self._opener = urllib.request.build_opener(*handlers)

    def describe(self) -> dict[str, Any]:
        return {"kind": "endpoint", "model": self.model, "base_url": self.base_url, "weak": self.weak}

    def chat(self, messages: list[Message], *, max_tokens: int) -> str:
        body = json.dumps(
            {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
        ).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            try:
                return self._post(body, headers)
            except _RetryableError as exc:
                last = str(exc)
                if attempt < self.retries:
                    wait = min(self.backoff * 2**attempt, self.max_backoff)
                    self._sleep(wait if exc.delay is None else min(exc.delay, self.max_backoff))
        raise EndpointError(
            f"Judge endpoint {self.url} failed {self.retries + 1} attempt(s); last failure: {last}. "
            "Check that the server is running and reachable, then run again to resume."
        )

    def _post(self, body: bytes, headers: dict[str, str]) -> str:
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = _one_line(exc.read().decode("utf-8", "replace"))
            msg = f"HTTP {exc.code} {exc.reason}: {detail}"
            if exc.code in RETRY_STATUS or exc.code >= 500:
                after = exc.headers.get("Retry-After") if exc.headers else None
                delay = float(after) if after and after.strip().isdigit() else None
                raise _RetryableError(msg, delay) from exc
            raise EndpointError(
                f"Judge endpoint {self.url} refused the request ({msg}); check the base URL (it usually "
                f"ends in /v1), the model name {self.model!r} and the API key."
            ) from exc
        except urllib.error.URLError as exc:
            raise _RetryableError(f"cannot connect ({_one_line(str(exc.reason))})") from exc
        except TimeoutError as exc:
            raise _RetryableError(f"no reply within {self.timeout:g} s") from exc
        except (http.client.HTTPException, OSError) as exc:
            raise _RetryableError(
                f"connection broken ({exc.__class__.__name__}: {_one_line(str(exc))})"
            ) from exc
        try:
            data = json.loads(raw)
            content = data["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise _RetryableError(
                f"reply is not a chat completion ({exc.__class__.__name__}): "
                f"{_one_line(raw.decode('utf-8', 'replace'), 120)!r}"
            ) from exc
        return "" if content is None else str(content)


class LocalJudge:
    """An in-process transformers causal LM, greedy; the tokenizer's chat template is used when it has one.

    Prompts longer than the model's context keep their end (the question) and are counted in
    ``n_truncated``. ``weak`` defaults to True below 3B parameters: such judges give a smoke test of the
    pipeline, not the paper's numbers.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str | None = None,
        weak: bool | None = None,
        max_context: int | None = None,
        constrained: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.constrained = constrained
        self.n_params = sum(p.numel() for p in model.parameters())
        self.name = name or str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
        self.weak = self.n_params < WEAK_JUDGE_PARAMS if weak is None else weak
        cfg = model.config
        self.max_context = (
            max_context or getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        )
        self.n_truncated = 0

    @classmethod
    def from_lm(cls, lm: LoadedLM, *, weak: bool | None = None, constrained: bool = True) -> LocalJudge:
        """A judge on a model loaded by ``darkmatter.lm.loading.load_lm``."""
        name = str(lm.identity.get("name", "")) or None
        return cls(lm.model, lm.tokenizer, name=name, weak=weak, constrained=constrained)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "local",
            "model": self.name,
            "n_params": self.n_params,
            "weak": self.weak,
            "constrained": self.constrained,
        }

    def detect(self, messages: list[Message], n: int) -> list[int] | None:
        """Constrained decoding of the answer ``[a1, a2, ...]``: at each slot the likelier of '0' and '1'.

        The reply always parses, so a small model's scores measure its judgement, not its formatting.
        None (free generation is used instead) when constraining is off or '0'/'1' are not single tokens.
        """
        digits = [self._single_token(c) for c in "01"]
        if not self.constrained or None in digits:
            return None
        zero, one = digits
        device = next(self.model.parameters()).device
        prompt = self._prompt_ids(messages)
        if self.max_context and prompt.shape[1] + 3 * n + 2 > self.max_context:
            prompt = prompt[:, -(self.max_context - 3 * n - 2) :]
            self.n_truncated += 1
        # transformers 5 names the key/value cache ``cache``; earlier versions ``past_key_values``
        cache_arg = (
            "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        )
        feed, past, answers = torch.cat([prompt, self._piece("[")], 1), None, []
        with torch.no_grad():
            for i in range(n):
                out = self.model(input_ids=feed.to(device), use_cache=True, **{cache_arg: past})
                past, logits = out[cache_arg], out.logits[0, -1]
                answers.append(int(logits[one] > logits[zero]))
                feed = self._piece(f"{answers[-1]}{', ' if i < n - 1 else ']'}")
        return answers

    def _single_token(self, text: str) -> int | None:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return int(ids[0]) if len(ids) == 1 else None

    def _piece(self, text: str) -> torch.Tensor:
        return torch.as_tensor([self.tokenizer(text, add_special_tokens=False).input_ids], dtype=torch.long)

    def _prompt_ids(self, messages: list[Message]) -> torch.Tensor:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant:"
        return tok(text, return_tensors="pt").input_ids

    def chat(self, messages: list[Message], *, max_tokens: int) -> str:
        from transformers import GenerationConfig

        ids = self._prompt_ids(messages)
        if self.max_context and ids.shape[1] + max_tokens > self.max_context:
            ids = ids[:, -(self.max_context - max_tokens) :]
            self.n_truncated += 1
        device = next(self.model.parameters()).device
        ids = ids.to(device)
        tok = self.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else self.model.generation_config.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
        gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        try:
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen
                )
        except (RuntimeError, ValueError) as exc:
            raise EndpointError(f"Local judge {self.name} failed to generate: {_one_line(str(exc))}") from exc
        return str(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
