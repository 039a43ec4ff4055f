"""`OpenAIEndpoint`: greedy replies from an OpenAI-compatible server (a vLLM server, a hosted API), the
judge's model when `judge.endpoint` is set (`rlhf_ray.rewards.judge`, docs/rewards.md "Judge"), and the
critic and reviser of Constitutional AI when `cai.endpoint` is set (`rlhf_ray.trainers.cai`, docs/feedback.md).

Decisions:
- One request per text, temperature 0. `api="chat"` sends the text as one user message to
  /chat/completions (the server applies its model's chat template); `api="completions"` sends it
  raw to /completions. `chat` sends whole conversations (lists of {role, content}) as they are; it
  needs api="chat". Both share everything below.
- At most `max_concurrency` requests in flight (a thread pool per call). `max_requests_per_s` spaces
  request starts, over all threads and retries included, 1/rate apart (a token bucket holding one
  token: no bursts). The first request that fails for good stops the call: requests not yet
  started are cancelled, so a dead endpoint is not billed for the rest of the batch.
- The openai client's own retries are off (`max_retries=0`) so every attempt is counted here.
  Connection errors, timeouts, 429, HTTP 5xx and a 200 whose body holds no reply text (`malformed`:
  not JSON, no choices, no text) are retried `retries` times after `backoff_s · 2^k` capped at 30 s,
  with equal jitter (half fixed, half random) so threads do not retry in lockstep; a 429's
  Retry-After (seconds) replaces the backoff, capped at 30 s too. Other 4xx (a bad key, an unknown
  model, a prompt longer than the server's context) fail at once. A failure is a RewardError naming
  the URL, the model and the kind of the last failed attempt; no reply is ever made up.
- An empty reply text (the model ended at once) is a reply, which the judge counts as unparseable.
- The API key is read once from the environment variable `api_key_env` (none: a placeholder, as a
  local vLLM server without --api-key expects). It is never in repr or in errors: server messages
  quoted in errors have it blanked, in case a server or proxy echoes the request's headers.
- `counters` (cumulative, for the run's metrics): requests (attempts), retries, failed attempts by
  kind (FAILURE_KINDS), prompt_tokens and completion_tokens from each reply's `usage`, and
  estimated_cost = prompt_tokens · input_price / 1e6 + completion_tokens · output_price / 1e6 (a float).
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import openai

from rlhf_ray.config import JudgeEndpointConfig
from rlhf_ray.rewards.base import RewardError
from rlhf_ray.rewards.retry import backoff_s, retry_after_s

FAILURE_KINDS = ("connection", "timeout", "rate_limited", "server_error", "malformed", "http_error")
NO_KEY = "EMPTY"  # the placeholder key sent without api_key_env
Prompt = str | list[dict[str, str]]  # what one request sends: chat messages (api="chat") or a text ("completions")


class _Retryable(Exception):
    """A failed attempt worth repeating; `retry_after`: the server's requested wait, seconds."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class _Stopped(Exception):
    """A request given up because another request of the same call failed for good."""


class _Spacing:
    """Request starts at least `1 / rate` seconds apart, over all threads."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self.next_start = 0.0
        self.lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        time.sleep(start - now)


class OpenAIEndpoint:
    def __init__(self, options: JudgeEndpointConfig, name: str = "judge"):
        self.options = options
        self.name = name
        self.route = "/chat/completions" if options.api == "chat" else "/completions"
        self.where = f"{options.base_url.rstrip('/')}{self.route} (model {options.model!r})"
        self._key = _api_key(options.api_key_env, name)
        self.client = openai.OpenAI(base_url=options.base_url, api_key=self._key, timeout=options.timeout_s,
                                    max_retries=0)
        self._spacing = _Spacing(options.max_requests_per_s)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(("requests", "retries", *FAILURE_KINDS,
                                                      "prompt_tokens", "completion_tokens"), 0)

    def __repr__(self) -> str:
        return f"OpenAIEndpoint(name={self.name!r}, url={self.options.base_url!r}, model={self.options.model!r})"

    @property
    def counters(self) -> dict[str, int | float]:
        o = self.options
        with self._lock:
            counts = dict(self._counts)
        cost = counts["prompt_tokens"] * o.input_price_per_mtok / 1e6 + counts["completion_tokens"] * o.output_price_per_mtok / 1e6
        return counts | {"estimated_cost": cost}

    def ask(self, texts: list[str], max_tokens: int) -> list[str]:
        """The greedy reply to each text, in order; a RewardError when any request fails for good."""
        if self.options.api == "chat":
            return self._each([[{"role": "user", "content": text}] for text in texts], max_tokens)
        return self._each(texts, max_tokens)

    def chat(self, conversations: list[list[dict[str, str]]], max_tokens: int) -> list[str]:
        """The greedy reply to each conversation (chat messages, sent as they are), in order; a RewardError
        when any request fails for good. Needs api="chat"."""
        if self.options.api != "chat":
            raise ValueError(f"{self!r}: chat() sends messages to /chat/completions; the endpoint has "
                             f"api={self.options.api!r}")
        return self._each(conversations, max_tokens)

    def _each(self, prompts: list[Prompt], max_tokens: int) -> list[str]:
        """One request per prompt (messages for api="chat", a text for "completions"), at most max_concurrency
        at once; the first that fails for good cancels those not yet started and is raised."""
        if not prompts:
            return []
        stop = threading.Event()  # set by the first request that fails for good: no further attempt starts

        def ask_one(index: int, prompt: Prompt) -> str:
            try:
                return self._ask_one(index, len(prompts), prompt, max_tokens, stop)
            except BaseException:
                stop.set()
                raise

        workers = min(self.options.max_concurrency, len(prompts))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"judge-{self.name}") as pool:
            futures = [pool.submit(ask_one, i, prompt) for i, prompt in enumerate(prompts)]
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                future.cancel()  # those not started yet, after a failure
        failures = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
        failures = [e for e in failures if not isinstance(e, _Stopped)]
        if failures:
            raise failures[0]
        return [future.result() for future in futures]

    def _ask_one(self, index: int, n: int, prompt: Prompt, max_tokens: int, stop: threading.Event) -> str:
        attempts = self.options.retries + 1
        for attempt in range(attempts):
            self._spacing.wait()
            if stop.is_set():
                raise _Stopped
            try:
                return self._request(prompt, max_tokens)
            except _Retryable as failure:
                self._count(failure.kind)
                if attempt + 1 == attempts:
                    raise RewardError(self.name, f"request {index + 1} of {n} to {self.where} failed after {attempts} "
                                                 f"attempts; last: {failure.kind}: {failure}",
                                      kind="timeout" if failure.kind == "timeout" else "exception") from None
                self._count("retries")
                stop.wait(failure.retry_after if failure.retry_after is not None else backoff_s(self.options.backoff_s, attempt))
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _request(self, prompt: Prompt, max_tokens: int) -> str:
        """One attempt: the reply text, its usage counted; _Retryable for what may pass, RewardError for what will not."""
        self._count("requests")
        o = self.options
        try:
            if o.api == "chat":
                raw = self.client.chat.completions.with_raw_response.create(
                    model=o.model, messages=prompt, max_tokens=max_tokens, temperature=0)
            else:
                raw = self.client.completions.with_raw_response.create(
                    model=o.model, prompt=prompt, max_tokens=max_tokens, temperature=0)
            body = raw.text
        except openai.APITimeoutError:
            raise _Retryable("timeout", f"no answer within timeout_s={o.timeout_s}") from None
        except openai.APIConnectionError as error:
            raise _Retryable("connection", self._redact(f"{error}: {error.__cause__ or ''}")) from None
        except openai.APIStatusError as error:
            raise self._status_failure(error) from None
        reply, prompt_tokens, completion_tokens = self._read(body)
        with self._lock:
            self._counts["prompt_tokens"] += prompt_tokens
            self._counts["completion_tokens"] += completion_tokens
        return reply

    def _read(self, body: str) -> tuple[str, int, int]:
        """(reply text, prompt tokens, completion tokens) of a 200 body; _Retryable("malformed") without reply text."""
        try:
            payload = json.loads(body)
            choice = payload["choices"][0]
            text = choice["message"]["content"] if self.options.api == "chat" else choice["text"]
        except (ValueError, KeyError, IndexError, TypeError):
            text = None
        if not isinstance(text, str):
            excerpt = self._redact(body)[:200] + ("…" if len(body) > 200 else "")
            raise _Retryable("malformed", f"HTTP 200 without reply text: {excerpt!r}")
        usage = payload.get("usage")
        return text, _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")

    def _status_failure(self, error: openai.APIStatusError) -> Exception:
        status, detail = error.status_code, self._redact(str(error.message))[:300]
        if status == 429:
            return _Retryable("rate_limited", f"HTTP 429: {detail}", _retry_after(error.response.headers.get("retry-after")))
        if status >= 500:
            return _Retryable("server_error", f"HTTP {status}: {detail}")
        self._count("http_error")
        return RewardError(self.name, f"{self.where} answered HTTP {status}: {detail}")

    def _redact(self, text: str) -> str:
        return text.replace(self._key, "<api key>") if self._key != NO_KEY else text

    def _count(self, kind: str) -> None:
        with self._lock:
            self._counts[kind] += 1


def _api_key(env: str | None, name: str) -> str:
    if env is None:
        return NO_KEY
    key = os.environ.get(env, "")
    if not key:
        raise RewardError(name, f"endpoint.api_key_env={env!r} names an environment variable that is unset or "
                                f"empty where the endpoint is called; export the API key there")
    return key


def _tokens(usage: dict | None, key: str) -> int:
    """A token count of a reply's `usage`; 0 when the server sent none."""
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and value >= 0 else 0


_retry_after = retry_after_s  # a Retry-After in seconds, capped at 30 s; None when absent or an HTTP date
