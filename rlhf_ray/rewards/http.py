"""`HttpReward`: a remote reward server as a reward source (ARCHITECTURE.md §5), standard library only.

Contract (served by `rlhf_ray.rewards.server`): `POST <url>` with JSON
`{"prompts": [str], "responses": [str], "metadata": [dict]}` → 200 and `{"scores": [float]}`,
one finite float per sample, in order.

Decisions:
- Samples go in requests of `batch_size`, at most `max_concurrency` in flight (a thread pool).
  The first failed batch stops the call: batches not yet started are skipped.
- Connection errors, timeouts, HTTP 5xx and 429 are retried `retries` times with exponential
  backoff, `backoff_s · 2^k` capped at 30 s, with equal jitter (half fixed, half random) so
  concurrent batches do not retry in lockstep. Everything else (other 4xx, malformed JSON, a
  missing `scores`, a wrong count, a non-finite value) is deterministic and fails at once.
- `timeout_s` bounds each connect and each read (urllib's socket timeout), not the whole request.
- Requests go to the configured URL only: redirects are refused (a redirect would resend the
  body and the token elsewhere) and proxy environment variables are ignored.
- The bearer token is read once from the environment variable named by `token_env` and is
  never printed: not in errors, not in `repr`.
- `counters` counts requests, retries and every failed attempt by kind (`FAILURE_KINDS`),
  cumulatively, for the trainer to log.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from rlhf_ray.config import HttpSourceConfig
from rlhf_ray.rewards.base import RewardError, check_scores

FAILURE_KINDS = ("connection", "timeout", "server_error", "http_error", "malformed_json", "missing_scores",
                 "wrong_count", "bad_value")
RETRYABLE_STATUS = (429,)  # and every 5xx
MAX_BACKOFF_S = 30.0
MAX_RESPONSE_BYTES = 64 << 20


class _Retryable(Exception):
    """A failed attempt worth repeating (the server may recover)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class _Skipped(Exception):
    """A batch not sent because an earlier one of the same call failed."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises HTTPError with the 3xx status


class HttpReward:
    def __init__(self, options: HttpSourceConfig, name: str | None = None):
        if options.url is None:
            raise RewardError(name or "http", "no url configured; set http.url to the reward server's endpoint")
        self.options = options
        self.url = options.url
        self.name = name or "http"
        self._headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if options.token_env:
            token = os.environ.get(options.token_env)
            if not token:
                raise RewardError(self.name, f"token_env={options.token_env!r} names an environment variable that is "
                                             f"unset or empty where the reward worker runs; export it there")
            self._headers["Authorization"] = f"Bearer {token}"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
        self._lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(("requests", "retries", *FAILURE_KINDS), 0)

    def __repr__(self) -> str:
        return f"HttpReward(name={self.name!r}, url={self.url!r})"

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
                time.sleep(self._backoff(attempt))
        return self._decode(raw, len(prompts), start, where)

    def _encode(self, prompts: list[str], responses: list[str], metadata: list[dict], start: int) -> bytes:
        try:
            return json.dumps({"prompts": prompts, "responses": responses, "metadata": metadata},
                              default=_plain).encode()
        except (TypeError, ValueError) as error:
            raise RewardError(self.name, f"metadata of samples {start}.. cannot be sent as JSON: {error}") from None

    def _post(self, body: bytes) -> bytes:
        """The 200 response body; _Retryable for what may pass on a retry, RewardError for what will not."""
        self._count("requests")
        request = urllib.request.Request(self.url, data=body, headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.options.timeout_s) as response:
                raw = response.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as error:
            detail = _error_detail(error)
            if error.code >= 500 or error.code in RETRYABLE_STATUS:
                raise _Retryable("server_error", f"HTTP {error.code}: {detail}") from None
            self._count("http_error")
            hint = " (redirects are not followed; configure the final URL)" if 300 <= error.code < 400 else ""
            raise RewardError(self.name, f"{self.url} answered HTTP {error.code}{hint}: {detail}") from None
        except (TimeoutError, socket.timeout) as error:
            raise _Retryable("timeout", f"timed out after {self.options.timeout_s} s ({error})") from None
        except urllib.error.URLError as error:
            kind = "timeout" if isinstance(error.reason, (TimeoutError, socket.timeout)) else "connection"
            raise _Retryable(kind, f"{kind} error: {error.reason}") from None
        except (http.client.HTTPException, ConnectionError) as error:
            raise _Retryable("connection", f"connection error: {type(error).__name__}: {error}") from None
        if len(raw) > MAX_RESPONSE_BYTES:
            self._count("malformed_json")
            raise RewardError(self.name, f"{self.url} sent more than {MAX_RESPONSE_BYTES >> 20} MiB")
        return raw

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

    def _backoff(self, attempt: int) -> float:
        delay = min(MAX_BACKOFF_S, self.options.backoff_s * 2**attempt)
        return delay / 2 + random.uniform(0, delay / 2)

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counters[kind] += 1


def _plain(value):
    """numpy / torch scalars and arrays in metadata → plain Python; anything else is not sendable."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _error_detail(error: urllib.error.HTTPError) -> str:
    """The server's `error` message when it sent one, else the start of the body."""
    try:
        raw = error.read(4096)
    except OSError:
        return error.reason or ""
    try:
        payload = json.loads(raw)
        if isinstance(payload, dict) and isinstance(payload.get("error"), str):
            return payload["error"][:500]
    except ValueError:
        pass
    return _excerpt(raw) if raw else str(error.reason)


def _excerpt(raw: bytes, limit: int = 200) -> str:
    text = raw[:limit].decode("utf-8", errors="replace")
    return repr(text) + ("…" if len(raw) > limit else "")
