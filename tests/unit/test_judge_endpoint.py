"""The judge asking an OpenAI-compatible endpoint (`rlhf_ray.rewards.endpoint`) through the real openai
client, against a fault-injecting fake server on 127.0.0.1: retries and what is retried, Retry-After,
the rate limit and the concurrency cap (measured at the server), both orders of a comparison, token
and cost counters, failures that name the endpoint, and the API key kept out of every message."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlhf_ray.config import JudgeEndpointConfig, JudgeSourceConfig, RewardSourceConfig
from rlhf_ray.rewards import JudgeReward, RewardError, WeightedSum
from rlhf_ray.rewards.endpoint import OpenAIEndpoint, _retry_after
from tests.local_http import send, serving

MODEL = "judge-model"
PROMPTS = ["say: abc", "say: hello", "say: xyz", "say: q"]
RESPONSES = ["aeiou", "brr", "zzz a", "oo"]
REFERENCES = ["bab", "aei", "zzz a", "ox"]
METADATA = [{"reference": ref} for ref in REFERENCES]
MALFORMED = {  # action → (content type, body) of a 200 without a reply text
    "not-json": ("text/html", b"<html>upstream busy</html>"),
    "no-choices": ("application/json", b'{"object": "chat.completion", "choices": []}'),
    "null-text": ("application/json", b'{"choices": [{"message": {"role": "assistant", "content": null}, "text": null}]}'),
}


class FakeServer(ThreadingHTTPServer):
    """/v1/chat/completions and /v1/completions. Each request takes the next action of `script`
    (then `default`): "ok" answers `reply(text)` with usage = character counts ("ok-no-usage": without
    usage); "429", "429:<s>"
    (with Retry-After), "500", "400" fail; MALFORMED keys send a broken 200; "hang" accepts and
    never answers; "echo-auth" is a 500 quoting the request's Authorization header."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, reply=lambda text: "Score: 7", delay_s: float = 0.0):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.reply, self.delay_s = reply, delay_s
        self.script: list[str] = []
        self.default = "ok"
        self.requests: list[tuple[float, str, dict, dict]] = []  # (arrival, path, body, headers in lower case)
        self.in_flight = self.max_in_flight = 0
        self.lock, self.release = threading.Lock(), threading.Event()
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}/v1"

    def next_action(self) -> str:
        with self.lock:
            return self.script.pop(0) if self.script else self.default

    def texts(self) -> list[str]:
        return [_text_of(body) for _, _, body, _ in self.requests]


def _text_of(body: dict) -> str:
    return body["messages"][0]["content"] if "messages" in body else body["prompt"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        fake: FakeServer = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with fake.lock:
            fake.requests.append((time.monotonic(), self.path, body, {k.lower(): v for k, v in self.headers.items()}))
            fake.in_flight += 1
            fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
        try:
            self._act(fake, fake.next_action(), body)
        finally:
            with fake.lock:
                fake.in_flight -= 1

    def _act(self, fake: FakeServer, action: str, body: dict) -> None:
        time.sleep(fake.delay_s)
        if action == "hang":
            fake.release.wait(30)
            self.close_connection = True
            return
        if action in ("ok", "ok-no-usage"):
            text, reply = _text_of(body), fake.reply(_text_of(body))
            choice = {"index": 0, "message": {"role": "assistant", "content": reply}} if "messages" in body else \
                {"index": 0, "text": reply}
            usage = {"prompt_tokens": len(text), "completion_tokens": len(reply), "total_tokens": len(text) + len(reply)}
            payload = {"choices": [choice]} | ({"usage": usage} if action == "ok" else {})
            return send(self, 200, json.dumps(payload).encode())
        if action in MALFORMED:
            return send(self, 200, MALFORMED[action][1], MALFORMED[action][0])
        if action == "echo-auth":
            return send(self, 500, json.dumps({"error": {"message": f"bad upstream for {self.headers['Authorization']}"}}).encode())
        status, _, retry_after = action.partition(":")
        headers = {"Retry-After": retry_after} if retry_after else {}
        send(self, int(status), json.dumps({"error": {"message": f"fault {status}"}}).encode(), headers=headers)


@pytest.fixture
def server():
    with serving(FakeServer()) as fake:
        try:
            yield fake
        finally:
            fake.release.set()  # before the shutdown: a hanging handler ends


def endpoint_options(server: FakeServer, backoff_s: float = 0.01, **fields) -> JudgeEndpointConfig:
    return JudgeEndpointConfig(base_url=server.base_url, model=MODEL, backoff_s=backoff_s, **fields)


def endpoint_judge(server: FakeServer, judge_options: dict | None = None, **fields) -> JudgeReward:
    options = JudgeSourceConfig(**(judge_options or {}), endpoint=endpoint_options(server, **fields))
    return JudgeReward(None, options=options, name="remote")


# --- the endpoint ------------------------------------------------------------------------------------


def test_retries_then_succeeds(server):
    server.script = ["429", "500", "not-json"]
    endpoint = OpenAIEndpoint(endpoint_options(server, retries=3))
    assert endpoint.ask(["grade this"], max_tokens=4) == ["Score: 7"]
    c = endpoint.counters
    assert (c["requests"], c["retries"], c["rate_limited"], c["server_error"], c["malformed"]) == (4, 3, 1, 1, 1)
    assert c["connection"] == c["timeout"] == c["http_error"] == 0
    assert server.texts() == ["grade this"] * 4


@pytest.mark.parametrize("action", sorted(MALFORMED))
def test_a_200_without_reply_text_is_malformed_and_retried(server, action):
    server.script = [action]
    endpoint = OpenAIEndpoint(endpoint_options(server, retries=1))
    assert endpoint.ask(["x"], max_tokens=4) == ["Score: 7"]
    assert endpoint.counters["malformed"] == 1 and endpoint.counters["requests"] == 2


def test_retry_after_is_honoured_and_backoff_waits(server):
    server.script = ["429:0.6"]
    OpenAIEndpoint(endpoint_options(server, backoff_s=0.0)).ask(["x"], max_tokens=4)
    (first, *_), (second, *_) = server.requests
    assert second - first >= 0.55  # Retry-After, not the zero backoff
    server.requests, server.script = [], ["429"]  # no Retry-After: backoff_s · 2^0 with equal jitter, in [0.2, 0.4]
    OpenAIEndpoint(endpoint_options(server, backoff_s=0.4)).ask(["x"], max_tokens=4)
    (first, *_), (second, *_) = server.requests
    assert second - first >= 0.19
    assert _retry_after("3600") == 30.0 and _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert _retry_after(None) is None and _retry_after("-4") == 0.0


def test_rate_limit_spaces_requests_over_all_threads(server):
    rate, n = 20.0, 10
    endpoint = OpenAIEndpoint(endpoint_options(server, max_requests_per_s=rate, max_concurrency=8))
    endpoint.ask(["warm-up"], max_tokens=4)  # the client's first request pays its set-up: it would arrive late
    server.requests = []
    endpoint.ask([f"q{i}" for i in range(n)], max_tokens=4)
    arrivals = sorted(t for t, *_ in server.requests)
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(arrivals) == n and min(gaps) >= 0.6 / rate, gaps  # without the limit 8 would arrive at once
    assert arrivals[-1] - arrivals[0] >= (n - 1) / rate * 0.95


def test_concurrency_cap_and_order(server):
    server.delay_s = 0.15
    server.reply = lambda text: text.upper()
    texts = [f"q{i}" for i in range(9)]
    assert OpenAIEndpoint(endpoint_options(server, max_concurrency=3)).ask(texts, max_tokens=4) == [t.upper() for t in texts]
    assert server.max_in_flight == 3


def test_failure_after_retries_names_url_model_and_kind(server):
    server.default = "500"
    endpoint = OpenAIEndpoint(endpoint_options(server, retries=2), name="remote")
    with pytest.raises(RewardError) as info:
        endpoint.ask(["x"], max_tokens=4)
    text = str(info.value)
    assert info.value.source == "remote" and info.value.kind == "exception"
    assert f"{server.base_url}/chat/completions" in text and repr(MODEL) in text
    assert "after 3 attempts; last: server_error: HTTP 500" in text and "fault 500" in text
    assert endpoint.counters["server_error"] == 3 and endpoint.counters["retries"] == 2


def test_timeout_is_retried_then_fails_as_a_timeout(server):
    server.default = "hang"
    endpoint = OpenAIEndpoint(endpoint_options(server, retries=1, timeout_s=0.3))
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"after 2 attempts; last: timeout: no answer within timeout_s=0.3") as info:
        endpoint.ask(["x"], max_tokens=4)
    assert info.value.kind == "timeout" and time.monotonic() - start >= 0.6
    assert endpoint.counters["timeout"] == 2 and len(server.requests) == 2


def test_connection_refused_is_a_connection_failure():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    options = JudgeEndpointConfig(base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, retries=1, backoff_s=0.01)
    endpoint = OpenAIEndpoint(options)
    with pytest.raises(RewardError, match=rf"127.0.0.1:{port}/v1/chat/completions .*last: connection"):
        endpoint.ask(["x"], max_tokens=4)
    assert endpoint.counters["connection"] == 2 and endpoint.counters["requests"] == 2


def test_other_4xx_fails_at_once_and_stops_the_call(server):
    server.default = "400"
    endpoint = OpenAIEndpoint(endpoint_options(server, retries=3, max_concurrency=1))
    with pytest.raises(RewardError, match="answered HTTP 400: .*fault 400"):
        endpoint.ask(["a", "b", "c", "d"], max_tokens=4)
    assert len(server.requests) == 1  # no retry, and the queued requests were never sent
    assert endpoint.counters["http_error"] == 1 and endpoint.counters["retries"] == 0


def test_the_api_key_is_sent_but_never_shown(server, monkeypatch):
    secret = "sk-test-0123456789abcdef"
    monkeypatch.setenv("JUDGE_KEY", secret)
    server.default = "echo-auth"
    judge = endpoint_judge(server, {"on_unparseable": "tie"}, api_key_env="JUDGE_KEY", retries=1)
    with pytest.raises(RewardError) as info:
        judge.score(["p"], ["r"], [{}])
    assert server.requests[0][3]["authorization"] == f"Bearer {secret}"  # the key did reach the server
    assert "bad upstream for Bearer <api key>" in str(info.value)
    for shown in (str(info.value), repr(info.value), repr(judge.asker), repr(judge), str(judge.counters)):
        assert secret not in shown


def test_an_unset_key_variable_fails_at_construction(server, monkeypatch):
    monkeypatch.delenv("JUDGE_KEY_UNSET", raising=False)
    with pytest.raises(RewardError, match=r"api_key_env='JUDGE_KEY_UNSET' names an environment variable that is unset"):
        OpenAIEndpoint(endpoint_options(server, api_key_env="JUDGE_KEY_UNSET"))
    monkeypatch.setenv("JUDGE_KEY_UNSET", "")
    with pytest.raises(RewardError, match="unset or empty"):
        OpenAIEndpoint(endpoint_options(server, api_key_env="JUDGE_KEY_UNSET"))


@pytest.mark.parametrize("api, path", [("chat", "/v1/chat/completions"), ("completions", "/v1/completions")])
def test_chat_and_completions_routes(server, api, path):
    judge = endpoint_judge(server, {"max_new_tokens": 5, "chat_template": True}, api=api)
    assert judge.score(["p"], ["r"], [{}]) == [7.0]
    [(_, seen_path, body, _)] = server.requests
    prompt = judge.last_queries[0].prompt
    assert seen_path == path and body["model"] == MODEL and body["max_tokens"] == 5 and body["temperature"] == 0
    if api == "chat":  # one user message; the server applies its chat template
        assert body["messages"] == [{"role": "user", "content": prompt}] and "prompt" not in body
    else:  # the raw rendered prompt
        assert body["prompt"] == prompt and "messages" not in body


# --- the judge over an endpoint ------------------------------------------------------------------------


def prefers_vowels(text: str) -> str:
    """Picks the response with the larger share of vowels; "A" when equal (a position-biased judge)."""
    a, b = (text.split(f"Response {x}: ")[1].split("\n")[0] for x in "AB")
    share = [sum(ch in "aeiou" for ch in r) / max(len(r), 1) for r in (a, b)]
    return "B" if share[1] > share[0] else "A"


def test_compare_asks_both_orders_and_scores_like_a_local_judge(server):
    server.reply = prefers_vowels
    judge = endpoint_judge(server, {"mode": "compare"}, max_concurrency=4)
    assert judge.score(PROMPTS, RESPONSES, METADATA) == [1.0, 0.0, 0.5, 1.0]
    seen = set(server.texts())
    for response, reference in zip(RESPONSES, REFERENCES):
        assert any(f"Response A: {response}\nResponse B: {reference}\n" in t for t in seen)
        assert any(f"Response A: {reference}\nResponse B: {response}\n" in t for t in seen)
    assert len(server.requests) == 8 and seen == {q.prompt for q in judge.last_queries}
    assert [(q.sample, q.swapped) for q in judge.last_queries] == [(i, s) for i in range(4) for s in (False, True)]
    assert judge.counters["verdicts"] == 8 and judge.counters["unparseable"] == 0


def test_unparseable_replies_keep_their_policies(server):
    server.reply = lambda text: "I cannot decide"
    judge = endpoint_judge(server, {"mode": "compare", "on_unparseable": "tie"})
    assert judge.score(PROMPTS, RESPONSES, METADATA) == [0.5] * 4
    assert judge.last_counts == {"verdicts": 8, "unparseable": 8, "no_verdict": 4}
    strict = endpoint_judge(server, {"mode": "grade", "on_unparseable": "error"})
    with pytest.raises(RewardError, match=r"'remote' \(sample 0\): judge reply 'I cannot decide' \(grade\) has no verdict"):
        strict.score(PROMPTS, RESPONSES, METADATA)


def test_tokens_and_cost_add_up_from_usage(server):
    server.reply = lambda text: "Score: 7"
    judge = endpoint_judge(server, {"mode": "grade"}, input_price_per_mtok=2.0, output_price_per_mtok=8.0)
    judge.score(PROMPTS, RESPONSES, METADATA)
    judge.score(PROMPTS[:2], RESPONSES[:2], METADATA[:2])
    prompt_tokens = sum(len(t) for t in server.texts())  # the fake's usage counts characters
    c = judge.counters
    assert c["requests"] == 6 and c["prompt_tokens"] == prompt_tokens and c["completion_tokens"] == 6 * len("Score: 7")
    assert c["estimated_cost"] == pytest.approx(prompt_tokens * 2.0 / 1e6 + 48 * 8.0 / 1e6)
    assert c["verdicts"] == 6  # the judge's own counters are kept beside the endpoint's
    server.script = ["ok-no-usage"]  # a server that reports no usage: the reply counts, its tokens cannot
    judge.score(PROMPTS[:1], RESPONSES[:1], METADATA[:1])
    assert judge.counters["requests"] == 7 and judge.counters["prompt_tokens"] == prompt_tokens
    combined = WeightedSum([(judge, 1.0)]).counters()  # what the reward worker reports as reward/<name>/<counter>
    assert isinstance(combined["remote/estimated_cost"], float) and combined["remote/prompt_tokens"] == prompt_tokens


def test_an_endpoint_judge_loads_no_model(server):
    judge = endpoint_judge(server)
    assert judge.engine is None and judge.tokenizer is None
    with pytest.raises(ValueError, match="judge.endpoint is set"):
        JudgeReward("some/model", options=JudgeSourceConfig(endpoint=endpoint_options(server)))
    cfg = RewardSourceConfig(kind="judge", judge=JudgeSourceConfig(endpoint=endpoint_options(server)))
    assert cfg.path is None  # the config needs no path for an endpoint judge
