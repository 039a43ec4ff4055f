"""`HttpReward`: a remote reward server as a reward source (ARCHITECTURE.md §5), on `httpx`.

Contract (served by `rlhf_ray.rewards.server`): `POST <url>` with JSON
`{"prompts": [str], "responses": [str], "metadata": [dict]}` → 200 and `{"scores": [float]}`,
one finite float per sample, in order.

Decisions:
- Samples go in requests of `batch_size`, at most `max_concurrency` in flight (a thread pool sharing
  one `httpx.Client`, whose pool keeps that many connections alive across batches and calls; `close()`
  releases them). The first failed batch stops the call: batches not yet started are skipped.
- Connection errors, timeouts, HTTP 5xx and 429 are retried `retries` times with exponential
  backoff, `backoff_s · 2^k` capped at 30 s, with equal jitter (half fixed, half random) so
  concurrent batches do not retry in lockstep. A 429 or 503 whose `Retry-After` gives seconds
  (RFC 9110 §10.2.3) waits at least that long, capped at 30 s; an HTTP-date there is ignored.
  Everything else (other 4xx, malformed JSON, a missing `scores`, a wrong count, a non-finite value,
  a body over 64 MiB) is deterministic and fails at once.
- `timeout_s` bounds each connect, read and write (and the wait for a pooled connection), not the
  whole request.
- Requests go to the configured URL only: redirects are refused (a redirect would resend the
  body and the token elsewhere) and proxy environment variables are ignored (`trust_env=False`).
- The bearer token is read once from the environment variable named by `token_env` and is
  never printed: not in errors, not in `repr`.
- `counters` counts requests, retries and every failed attempt by kind (`FAILURE_KINDS`),
  cumulatively, for the trainer to log.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

import httpx

from rlhf_ray.config import HttpSourceConfig
from rlhf_ray.rewards.base import RewardError, check_scores
from rlhf_ray.rewards.retry import backoff_s, retry_after_s

FAILURE_KINDS = ("connection", "timeout", "server_error", "http_error", "malformed_json", "missing_scores",
                 "wrong_count", "bad_value")
RETRYABLE_STATUS = (429,)  # and every 5xx
RETRY_AFTER_STATUS = (429, 503)
MAX_RESPONSE_BYTES = 64 << 20


class _Retryable(Exception):
    """A failed attempt worth repeating (the server may recover); `retry_after`: the server's least wait, s."""

    def __init__(self, kind: str, message: str, retry_after: float = 0.0):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class _Skipped(Exception):
    """A batch not sent because an earlier one of the same call failed."""


class HttpReward:
    def __init__(self, options: HttpSourceConfig, name: str | None = None):
        if options.url is None:
            raise RewardError(name or "http", "no url configured; set http.url to the reward server's endpoint")
        self.options = options
        self.url = options.url
        self.name = name or "http"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if options.token_env:
            token = os.environ.get(options.token_env)
            if not token:
                raise RewardError(self.name, f"token_env={options.token_env!r} names an environment variable that is "
                                             f"unset or empty where the reward worker runs; export it there")
            headers["Authorization"] = f"Bearer {token}"
        limits = httpx.Limits(max_connections=options.max_concurrency,
                              max_keepalive_connections=options.max_concurrency)
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(options.timeout_s), limits=limits,
                                    follow_redirects=False, trust_env=False)
        self._lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(("requests", "retries", *FAILURE_KINDS), 0)

    def __repr__(self) -> str:
        return f"HttpReward(name={self.name!r}, url={self.url!r})"

    def close(self) -> None:
        """Close the pooled connections; `score` must not be called afterwards."""
        self._client.close()

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        size, failed = self.options.batch_size, threading.Event()
        starts = range(0, len(prompts), size)
        with ThreadPoolExecutor(max_workers=self.options.max_concurrency, thread_name_prefix=f"reward-{self.name}") as pool:
            futures = [pool.submit(self._score_batch, start, prompts[start : start + size],
                                   responses[start : start + size], metadata[start : start + size], failed)
                       for start in starts]
            scores: list[float] = []
            for future in futures:
                scores += future.result()  # batches start in order, so a failed one comes before any skipped
        return scores

    def _score_batch(self, start: int, prompts: list[str], responses: list[str], metadata: list[dict],
                     failed: threading.Event) -> list[float]:
        """Scores of one batch; once any batch of the call has failed, batches not yet started are skipped."""
        if failed.is_set():
            raise _Skipped
        try:
            return self._request_scores(start, prompts, responses, metadata)
        except BaseException:
            failed.set()
            raise

    def _request_scores(self, start: int, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        where = f"request for samples {start}..{start + len(prompts) - 1} to {self.url}"
        body = self._encode(prompts, responses, metadata, start)
        attempts = self.options.retries + 1
        for attempt in range(attempts):
            try:
                raw = self._post(body)
                break
            except _Retryable as error:
                self._count(error.kind)
                if attempt + 1 == attempts:
                    kind = "timeout" if error.kind == "timeout" else "exception"
                    raise RewardError(self.name, f"{where} failed after {attempts} attempts: {error}", kind=kind) from None
                self._count("retries")
                time.sleep(max(backoff_s(self.options.backoff_s, attempt), error.retry_after))
        return self._decode(raw, len(prompts), start, where)

    def _encode(self, prompts: list[str], responses: list[str], metadata: list[dict], start: int) -> bytes:
        try:
            return json.dumps({"prompts": prompts, "responses": responses, "metadata": metadata},
                              default=_plain).encode()
        except (TypeError, ValueError) as error:
            raise RewardError(self.name, f"metadata of samples {start}.. cannot be sent as JSON: {error}") from None

    def _post(self, body: bytes) -> bytes:
        """The 2xx response body; _Retryable for what may pass on a retry, RewardError for what will not."""
        self._count("requests")
        try:
            with self._client.stream("POST", self.url, content=body) as response:
                if not response.is_success:
                    self._raise_for_status(response)
                raw = _read(response, MAX_RESPONSE_BYTES + 1)
        except httpx.TimeoutException as error:
            raise _Retryable("timeout", f"timed out after {self.options.timeout_s} s ({error})") from None
        except httpx.RequestError as error:
            raise _Retryable("connection", f"connection error: {type(error).__name__}: {error}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            self._count("malformed_json")
            raise RewardError(self.name, f"{self.url} sent more than {MAX_RESPONSE_BYTES >> 20} MiB")
        return raw

    def _raise_for_status(self, response: httpx.Response) -> NoReturn:
        status, detail = response.status_code, _error_detail(response)
        if status >= 500 or status in RETRYABLE_STATUS:
            wait = _retry_after(response) if status in RETRY_AFTER_STATUS else 0.0
            raise _Retryable("server_error", f"HTTP {status}: {detail}", wait)
        self._count("http_error")
        hint = " (redirects are not followed; configure the final URL)" if 300 <= status < 400 else ""
        raise RewardError(self.name, f"{self.url} answered HTTP {status}{hint}: {detail}")

    def _decode(self, raw: bytes, n: int, start: int, where: str) -> list[float]:
        try:
            payload = json.loads(raw)
        except ValueError:
            self._count("malformed_json")
            raise RewardError(self.name, f"{where}: the response is not JSON: {_excerpt(raw)}") from None
        if not isinstance(payload, dict) or "scores" not in payload:
            self._count("missing_scores")
            raise RewardError(self.name, f"{where}: the response has no 'scores' key: {_excerpt(raw)}")
        try:
            return check_scores(self.name, payload["scores"], n)
        except RewardError as error:
            self._count("wrong_count" if error.index is None else "bad_value")
            index = None if error.index is None else start + error.index
            raise RewardError(self.name, f"{where}: {error.message}", index, kind=error.kind) from None

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counters[kind] += 1


def _plain(value):
    """numpy / torch scalars and arrays in metadata → plain Python; anything else is not sendable."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _read(response: httpx.Response, limit: int) -> bytes:
    """The (decoded) body up to `limit` bytes; the rest is never read."""
    raw = bytearray()
    for chunk in response.iter_bytes():
        raw += chunk
        if len(raw) >= limit:
            break
    return bytes(raw[:limit])


def _retry_after(response: httpx.Response) -> float:
    """The wait `Retry-After` asks for in seconds, capped at 30 s; 0 when absent, not positive, or an HTTP-date."""
    return retry_after_s(response.headers.get("Retry-After")) or 0.0


def _error_detail(response: httpx.Response) -> str:
    """The server's `error` message when it sent one, else the start of the body."""
    try:
        raw = _read(response, 4096)
    except httpx.RequestError:
        return response.reason_phrase
    try:
        payload = json.loads(raw)
        if isinstance(payload, dict) and isinstance(payload.get("error"), str):
            return payload["error"][:500]
    except ValueError:
        pass
    return _excerpt(raw) if raw else response.reason_phrase


def _excerpt(raw: bytes, limit: int = 200) -> str:
    text = raw[:limit].decode("utf-8", errors="replace")
    return repr(text) + ("…" if len(raw) > limit else "")
