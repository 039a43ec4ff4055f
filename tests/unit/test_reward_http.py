"""HTTP reward path against real servers on 127.0.0.1: the client (`HttpReward`) and the reward server
(`rlhf_ray.rewards.server`) agree with the function they serve; batching, the concurrency limit,
retries with backoff, and every failure kind give a clear RewardError and are counted. The broken
servers are tiny real HTTP servers written here, each answering one deliberate way."""

import json
import math
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

import rlhf_ray.rewards.http as reward_http
from rlhf_ray.config import HttpSourceConfig, RewardSourceConfig
from rlhf_ray.rewards import FunctionReward, HttpReward, RewardError, build_reward_sources
from rlhf_ray.rewards.server import RewardServer
from rlhf_ray.toy import vowel_reward

PROMPTS = [f"say: p{i}\n" for i in range(10)]
RESPONSES = ["aeiou", "boom", "zzz a", "", "a much longer response, with punctuation!", "x", "oo", "brr", "ia", "q u"]
METADATA = [{"stopped": i % 2 == 0, "reference": "ok"} for i in range(10)]
FAST_RETRY = {"retries": 2, "backoff_s": 0.01}


@pytest.fixture
def vowel_server():
    with RewardServer(FunctionReward("rlhf_ray.toy.task:vowel_reward", name="vowel"), port=0) as server:
        yield server


def client(url: str, **options) -> HttpReward:
    return HttpReward(HttpSourceConfig(url=url, **options), name="remote")


# --- against the real reward server ---------------------------------------------------------------


def test_remote_scores_equal_the_function(vowel_server):
    direct = vowel_reward(PROMPTS, RESPONSES, METADATA)
    assert client(vowel_server.url, batch_size=3, max_concurrency=2).score(PROMPTS, RESPONSES, METADATA) == direct
    assert client(vowel_server.url, batch_size=64).score(PROMPTS, RESPONSES, METADATA) == direct
    assert vowel_server.stats["requests"] == 4 + 1 and vowel_server.stats["failed"] == 0


def test_config_builds_an_http_source(vowel_server):
    cfg = RewardSourceConfig(kind="http", name="rm", http=HttpSourceConfig(url=vowel_server.url, batch_size=4))
    combined = build_reward_sources([cfg], [None])
    total, per_source = combined.score_all(PROMPTS, RESPONSES, METADATA)
    assert per_source["rm"] == total == vowel_reward(PROMPTS, RESPONSES)
    assert combined.counters()["rm/requests"] == 3 and combined.counters()["rm/retries"] == 0


class SlowSource:
    """Records each batch it scores and takes `seconds` per call, so requests pile up in the server."""

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
    with RewardServer(source, port=0) as server:
        scores = client(server.url, batch_size=2, max_concurrency=max_concurrency).score(prompts, responses, [{}] * 16)
        assert scores == vowel_reward(prompts, responses)
        assert server.stats["requests"] == 8
        assert server.stats["max_in_flight"] == max_concurrency  # reached, never exceeded
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
    with RewardServer(picky, port=0) as server:
        reward = client(server.url, **FAST_RETRY)
        with pytest.raises(RewardError, match=r"'remote'.*HTTP 422: reward source 'picky' \(sample 1\): score 'x' is not"):
            reward.score(PROMPTS[:2], RESPONSES[:2], METADATA[:2])
        assert picky.calls == 1 and reward.counters["http_error"] == 1
    # Any other exception may be transient: 500, retried.
    crashing = RaisingSource(MemoryError("out of memory"))
    with RewardServer(crashing, port=0) as server:
        reward = client(server.url, **FAST_RETRY)
        with pytest.raises(RewardError, match="after 3 attempts: HTTP 500: .*MemoryError: out of memory"):
            reward.score(PROMPTS[:2], RESPONSES[:2], METADATA[:2])
        assert crashing.calls == 3 and reward.counters["server_error"] == 3 and reward.counters["retries"] == 2
        assert server.stats["failed"] == 3


def post(url: str, body: bytes, headers: dict | None = None, method: str = "POST") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body if method == "POST" else None, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.parametrize("body, words", [
    (b"{not json", ["not valid JSON"]),
    (b"[1, 2]", ["must be a JSON object", "list"]),
    (b'{"prompts": ["a"]}', ["missing keys ['responses']"]),
    (b'{"prompts": ["a"], "responses": ["b"], "scores": [1]}', ["unknown keys ['scores']"]),
    (b'{"prompts": ["a", "b"], "responses": ["b"]}', ["lengths differ: 2 prompts, 1 responses, 2 metadata"]),
    (b'{"prompts": ["a"], "responses": ["b"], "metadata": [{}, {}]}', ["lengths differ"]),
    (b'{"prompts": ["a", 3], "responses": ["b", "c"]}', ["'prompts'[1] must be a str, got int"]),
    (b'{"prompts": "a", "responses": ["b"]}', ["'prompts' must be a list"]),
    (b'{"prompts": ["a"], "responses": ["b"], "metadata": ["x"]}', ["'metadata'[0] must be a dict"]),
])
def test_server_rejects_bad_requests(vowel_server, body, words):
    status, answer = post(vowel_server.url, body)
    assert status == 400
    for word in words:
        assert word in answer["error"]
    assert vowel_server.stats["rejected"] == 1


def test_server_paths_health_and_size_limit():
    with RewardServer(FunctionReward("rlhf_ray.toy.task:vowel_reward", name="vowel"), port=0,
                      max_request_bytes=200) as server:
        assert post(server.url, b'{"prompts": ["a"], "responses": ["ae"]}') == (200, {"scores": [1.0]})
        status, answer = post(server.url, json.dumps({"prompts": ["a" * 300], "responses": ["b"]}).encode())
        assert status == 413 and "exceeds the limit of 200" in answer["error"]
        assert post(server.url.replace("/score", "/other"), b"{}")[0] == 404
        status, health = post(server.health_url, b"", method="GET")
        assert status == 200 and health["status"] == "ok" and health["source"] == "vowel" and health["requests"] == 3
        assert post(server.url.replace("/score", "/nope"), b"", method="GET")[0] == 404


def test_bearer_token(monkeypatch):
    with RewardServer(FunctionReward("rlhf_ray.toy.task:vowel_reward"), port=0, token="s3cret-token") as server:
        with pytest.raises(RewardError, match="HTTP 401: missing or wrong bearer token") as info:
            client(server.url, **FAST_RETRY).score(PROMPTS[:1], RESPONSES[:1], METADATA[:1])
        monkeypatch.setenv("RLHF_RAY_TEST_TOKEN", "wrong-token")
        wrong = HttpReward(HttpSourceConfig(url=server.url, token_env="RLHF_RAY_TEST_TOKEN"))
        with pytest.raises(RewardError, match="HTTP 401") as info:
            wrong.score(PROMPTS[:1], RESPONSES[:1], METADATA[:1])
        assert "wrong-token" not in str(info.value) and "wrong-token" not in repr(wrong)
        monkeypatch.setenv("RLHF_RAY_TEST_TOKEN", "s3cret-token")
        right = HttpReward(HttpSourceConfig(url=server.url, token_env="RLHF_RAY_TEST_TOKEN"))
        assert right.score(PROMPTS, RESPONSES, METADATA) == vowel_reward(PROMPTS, RESPONSES)
    monkeypatch.delenv("RLHF_RAY_TEST_TOKEN")
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

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/score", bodies
    finally:
        release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


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
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    reward = client(vowel_server.url, retries=0)
    assert reward.score(PROMPTS, RESPONSES, METADATA) == vowel_reward(PROMPTS, RESPONSES)


def test_the_request_body_is_the_contract():
    with broken_server(lambda body, release: (200, scores_json([1.0] * len(body["prompts"])))) as (url, bodies):
        client(url, batch_size=64).score(PROMPTS[:3], RESPONSES[:3], METADATA[:3])
    assert bodies == [{"prompts": PROMPTS[:3], "responses": RESPONSES[:3], "metadata": METADATA[:3]}]


# --- the command line -------------------------------------------------------------------------------


def test_server_command_serves_and_stops_cleanly():
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.rewards.server", "--source-kind", "function",
         "--source-path", "rlhf_ray.toy.task:vowel_reward", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        banner = lines.get(timeout=25)
        assert "serving reward source 'vowel_reward' at http://127.0.0.1:" in banner, banner
        url = banner.split(" at ")[1].split()[0]
        assert client(url).score(PROMPTS, RESPONSES, METADATA) == vowel_reward(PROMPTS, RESPONSES)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert "reward server stopped" in lines.get(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
