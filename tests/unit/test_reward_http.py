"""The HTTP reward client (`HttpReward`) against real servers on 127.0.0.1: scores equal the function's
when a server serves it; batching, the concurrency limit, retries with backoff, and every failure kind
give a clear RewardError and are counted. The servers are tiny stdlib servers written here (no Ray):
`scoring_server` serves a reward source in the contract of `python -m rlhf_ray.rewards.server`; each
`broken_server` answers one deliberate way. The Serve ingress itself: tests/integration/test_serve_http_contract.py."""

import json
import math
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

import rlhf_ray.rewards.http as reward_http
from rlhf_ray.config import HttpSourceConfig, RewardSourceConfig
from rlhf_ray.rewards import FunctionReward, HttpReward, RewardError, build_reward_sources
from rlhf_ray.toy import vowel_reward
from tests.local_http import send_json, serving

PROMPTS = [f"say: p{i}\n" for i in range(10)]
RESPONSES = ["aeiou", "boom", "zzz a", "", "a much longer response, with punctuation!", "x", "oo", "brr", "ia", "q u"]
METADATA = [{"stopped": i % 2 == 0, "reference": "ok"} for i in range(10)]
FAST_RETRY = {"retries": 2, "backoff_s": 0.01}


@contextmanager
def scoring_server(source):
    """`source` served at http://127.0.0.1:<free port>/score as the reward server answers: 200 {"scores"},
    422 for a RewardError, 500 for any other exception (both {"error"}). Yields (url, stats): requests,
    answers other than 200 (`failed`), and the most requests in flight at once (`max_in_flight`)."""
    stats, lock = {"requests": 0, "failed": 0, "in_flight": 0, "max_in_flight": 0}, threading.Lock()

    def answer(body: dict) -> tuple[int, dict]:
        try:
            return 200, {"scores": source.score(body["prompts"], body["responses"], body["metadata"])}
        except RewardError as error:
            return 422, {"error": str(error)}
        except Exception as error:  # noqa: BLE001 - the contract's 500
            return 500, {"error": f"reward source '{source.name}' raised {type(error).__name__}: {error}"}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            with lock:
                stats["requests"] += 1
                stats["in_flight"] += 1
                stats["max_in_flight"] = max(stats["max_in_flight"], stats["in_flight"])
            status, body = answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            with lock:  # before the answer is sent: a client that has it may send its next request at once
                stats["in_flight"] -= 1
                stats["failed"] += status != 200
            send_json(self, status, body)

        def log_message(self, *args):
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as httpd:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/score", stats


@pytest.fixture
def vowel_server():
    with scoring_server(FunctionReward("rlhf_ray.toy.task:vowel_reward", name="vowel")) as served:
        yield served


def client(url: str, **options) -> HttpReward:
    return HttpReward(HttpSourceConfig(url=url, **options), name="remote")


# --- against a server that scores -------------------------------------------------------------------


def test_remote_scores_equal_the_function(vowel_server):
    url, stats = vowel_server
    direct = vowel_reward(PROMPTS, RESPONSES, METADATA)
    assert client(url, batch_size=3, max_concurrency=2).score(PROMPTS, RESPONSES, METADATA) == direct
    assert client(url, batch_size=64).score(PROMPTS, RESPONSES, METADATA) == direct
    assert stats["requests"] == 4 + 1 and stats["failed"] == 0


def test_config_builds_an_http_source(vowel_server):
    url, _ = vowel_server
    cfg = RewardSourceConfig(kind="http", name="rm", http=HttpSourceConfig(url=url, batch_size=4))
    combined = build_reward_sources([cfg], [None])
    total, per_source = combined.score_all(PROMPTS, RESPONSES, METADATA)
    assert per_source["rm"] == total == vowel_reward(PROMPTS, RESPONSES)
    assert combined.counters()["rm/requests"] == 3 and combined.counters()["rm/retries"] == 0


class SlowSource:
    """Records each batch it scores and takes `seconds` per call, so requests overlap in the server."""

    name = "slow"

    def __init__(self, seconds: float):
        self.seconds, self.batches = seconds, []

    def score(self, prompts, responses, metadata):
        self.batches.append(list(prompts))
        time.sleep(self.seconds)
        return vowel_reward(prompts, responses)


@pytest.mark.parametrize("max_concurrency", [1, 3])
def test_batches_and_concurrency_limit(max_concurrency):
    source = SlowSource(0.1)
    prompts, responses = PROMPTS + PROMPTS[:6], RESPONSES + RESPONSES[:6]  # 16 samples → 8 requests of 2
    with scoring_server(source) as (url, stats):
        scores = client(url, batch_size=2, max_concurrency=max_concurrency).score(prompts, responses, [{}] * 16)
        assert scores == vowel_reward(prompts, responses)
        assert stats["requests"] == 8
        assert stats["max_in_flight"] == max_concurrency  # reached, never exceeded
    assert sorted(p for batch in source.batches for p in batch) == sorted(prompts)
    assert [len(batch) for batch in source.batches] == [2] * 8


class RaisingSource:
    name = "picky"

    def __init__(self, error: Exception):
        self.error, self.calls = error, 0

    def score(self, prompts, responses, metadata):
        self.calls += 1
        raise self.error


def test_source_failures_reach_the_client():
    # A RewardError is deterministic: 422, not retried, the server's message passed on.
    picky = RaisingSource(RewardError("picky", "score 'x' is not a number", 1))
    with scoring_server(picky) as (url, stats):
        reward = client(url, **FAST_RETRY)
        with pytest.raises(RewardError, match=r"'remote'.*HTTP 422: reward source 'picky' \(sample 1\): score 'x' is not"):
            reward.score(PROMPTS[:2], RESPONSES[:2], METADATA[:2])
        assert picky.calls == 1 and reward.counters["http_error"] == 1
    # Any other exception may be transient: 500, retried.
    crashing = RaisingSource(MemoryError("out of memory"))
    with scoring_server(crashing) as (url, stats):
        reward = client(url, **FAST_RETRY)
        with pytest.raises(RewardError, match="after 3 attempts: HTTP 500: .*MemoryError: out of memory"):
            reward.score(PROMPTS[:2], RESPONSES[:2], METADATA[:2])
        assert crashing.calls == 3 and reward.counters["server_error"] == 3 and reward.counters["retries"] == 2
        assert stats["failed"] == 3


def test_an_unset_token_env_fails_at_construction(monkeypatch):
    monkeypatch.delenv("RLHF_RAY_TEST_TOKEN", raising=False)
    with pytest.raises(RewardError, match="token_env='RLHF_RAY_TEST_TOKEN' names an environment variable that is unset"):
        HttpReward(HttpSourceConfig(url="http://127.0.0.1:9/score", token_env="RLHF_RAY_TEST_TOKEN"))


# --- deliberately broken servers --------------------------------------------------------------------


@contextmanager
def broken_server(reply, connections: list | None = None):
    """A real server on 127.0.0.1 whose POST handler answers `reply(body, release) -> (status, bytes[, headers])`.
    `release` is set on exit, so a handler waiting on it ends; yields (url, list of request bodies).
    Given `connections`, it keeps connections alive (HTTP/1.1) and appends each new one's client address."""
    bodies, release = [], threading.Event()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0" if connections is None else "HTTP/1.1"

        def setup(self):
            super().setup()
            if connections is not None:
                connections.append(self.client_address)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            status, data, *headers = reply(body, release)
            try:
                self.send_response(status)
                for key, value in (headers[0] if headers else {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (timeout test)

        def log_message(self, *args):
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as httpd:
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}/score", bodies
        finally:
            release.set()  # before the shutdown: a handler waiting on it ends


def scores_json(values) -> bytes:
    return json.dumps({"scores": values}).encode()


def test_timeout_is_retried_then_reported():
    def sleeps(body, release):
        release.wait(10)  # far past the client's timeout; released when the test ends
        return 200, scores_json([0.0] * len(body["prompts"]))

    with broken_server(sleeps) as (url, bodies):
        reward = client(url, timeout_s=0.2, retries=2, backoff_s=0.05)
        start = time.monotonic()
        with pytest.raises(RewardError) as info:
            reward.score(PROMPTS[:2], RESPONSES[:2], METADATA[:2])
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert "reward source 'remote'" in message and "samples 0..1" in message and url in message
        assert "failed after 3 attempts: timed out after 0.2 s" in message
        assert reward.counters["timeout"] == 3 and reward.counters["retries"] == 2 and reward.counters["requests"] == 3
        assert len(bodies) == 3
        assert elapsed >= 0.6 + 0.025 + 0.05  # 3 timeouts + at least half of each backoff (0.05, 0.1)
        assert elapsed < 30  # not seconds where milliseconds were meant (generous: a loaded machine is slow)


def test_connection_refused_is_retried_then_reported():
    with broken_server(lambda body, release: (200, b"")) as (url, _):
        pass  # the port is free again once the server is closed
    reward = client(url, **FAST_RETRY)
    with pytest.raises(RewardError, match="failed after 3 attempts: connection error"):
        reward.score(PROMPTS[:2], RESPONSES[:2], METADATA[:2])
    assert reward.counters["connection"] == 3 and reward.counters["retries"] == 2


def nan_in_second_batch(body, release):
    values = [0.5] * len(body["prompts"])
    if body["prompts"][0] == PROMPTS[2]:
        values[1] = math.nan
    return 200, json.dumps({"scores": values}).encode()  # json writes the NaN literal, as a sloppy server would


@pytest.mark.parametrize("reply, kind, attempts, index, words", [
    (lambda b, r: (200, b"{not json"), "malformed_json", 1, None, ["the response is not JSON", "'{not json'"]),
    (lambda b, r: (200, b'{"score": [1, 2]}'), "missing_scores", 1, None, ["no 'scores' key"]),
    (lambda b, r: (200, scores_json([0.5])), "wrong_count", 1, None, ["returned 1 scores for 2 samples"]),
    (nan_in_second_batch, "bad_value", 2, 3, ["score nan is not finite", "samples 2..3"]),
    (lambda b, r: (200, scores_json([0.1, "high"])), "bad_value", 1, 1, ["'high'", "not a number"]),
    (lambda b, r: (500, b'{"error": "model crashed"}'), "server_error", 3, None, ["after 3 attempts: HTTP 500: model crashed"]),
    (lambda b, r: (503, b"<html>busy</html>"), "server_error", 3, None, ["HTTP 503: '<html>busy</html>'"]),
    (lambda b, r: (404, b"nothing here"), "http_error", 1, None, ["answered HTTP 404", "nothing here"]),
    (lambda b, r: (302, b"", {"Location": "http://127.0.0.1:9/elsewhere"}), "http_error", 1, None,
     ["HTTP 302 (redirects are not followed"]),
])
def test_broken_servers_give_clear_counted_errors(reply, kind, attempts, index, words):
    with broken_server(reply) as (url, bodies):
        reward = client(url, batch_size=2, max_concurrency=1, **FAST_RETRY)
        with pytest.raises(RewardError) as info:
            reward.score(PROMPTS[:4], RESPONSES[:4], METADATA[:4])
    message = str(info.value)
    assert info.value.source == "remote" and info.value.index == index
    for word in words:
        assert word in message
    assert reward.counters[kind] == (attempts if kind == "server_error" else 1)
    assert len(bodies) == attempts  # retried only what may pass on a retry; the redirect was not followed
    assert sum(reward.counters[k] for k in ("malformed_json", "missing_scores", "wrong_count", "bad_value",
                                            "http_error", "server_error", "timeout", "connection")) == reward.counters[kind]


@pytest.mark.parametrize("status, retry_after, least_wait", [(429, "1", 1.0), (503, "1", 1.0), (500, "30", 0.0)])
def test_retry_after_seconds_are_honoured(status, retry_after, least_wait):
    """A 429/503 `Retry-After` is waited out although the backoff is 10 ms; on a 500 it means nothing."""
    arrivals = []

    def busy_once(body, release):
        arrivals.append(time.monotonic())
        if len(arrivals) == 1:
            return status, b'{"error": "busy"}', {"Retry-After": retry_after}
        return 200, scores_json([0.5] * len(body["prompts"]))

    with broken_server(busy_once) as (url, bodies):
        reward = client(url, **FAST_RETRY)
        assert reward.score(PROMPTS[:2], RESPONSES[:2], METADATA[:2]) == [0.5, 0.5]
        reward.close()
    wait = arrivals[1] - arrivals[0]
    assert least_wait <= wait < least_wait + 5  # seconds, not milliseconds or minutes
    assert reward.counters["retries"] == 1 and reward.counters["server_error"] == 1 and len(bodies) == 2


@pytest.mark.parametrize("header, seconds", [
    ("2", 2.0), ("0.5", 0.5), ("3600", 30.0), ("inf", 30.0), ("0", 0.0), ("-1", 0.0), ("nan", 0.0),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0), (None, 0.0),
])
def test_retry_after_is_seconds_capped_at_30(header, seconds):
    response = httpx.Response(429, headers={} if header is None else {"Retry-After": header})
    assert reward_http._retry_after(response) == seconds


def test_connections_are_pooled_across_batches_and_calls():
    connections = []
    with broken_server(lambda body, release: (200, scores_json([0.5] * len(body["prompts"]))),
                       connections) as (url, bodies):
        reward = client(url, batch_size=2, max_concurrency=2)
        for _ in range(2):
            assert reward.score(PROMPTS, RESPONSES, METADATA) == [0.5] * 10
        reward.close()
    assert len(bodies) == reward.counters["requests"] == 10
    assert 1 <= len(connections) <= 2  # at most one per concurrent request, not one per request


def test_a_body_over_the_size_limit_fails_at_once(monkeypatch):
    monkeypatch.setattr(reward_http, "MAX_RESPONSE_BYTES", 100)
    with broken_server(lambda body, release: (200, scores_json([0.5] * 30))) as (url, bodies):
        reward = client(url, batch_size=64, **FAST_RETRY)
        with pytest.raises(RewardError, match=f"{url} sent more than"):
            reward.score(PROMPTS[:2], RESPONSES[:2], METADATA[:2])
    assert len(bodies) == 1 and reward.counters["malformed_json"] == 1 and reward.counters["retries"] == 0


def test_proxy_environment_is_ignored(monkeypatch, vowel_server):
    url, _ = vowel_server
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    reward = client(url, retries=0)
    assert reward.score(PROMPTS, RESPONSES, METADATA) == vowel_reward(PROMPTS, RESPONSES)


def test_the_request_body_is_the_contract():
    with broken_server(lambda body, release: (200, scores_json([1.0] * len(body["prompts"])))) as (url, bodies):
        client(url, batch_size=64).score(PROMPTS[:3], RESPONSES[:3], METADATA[:3])
    assert bodies == [{"prompts": PROMPTS[:3], "responses": RESPONSES[:3], "metadata": METADATA[:3]}]

