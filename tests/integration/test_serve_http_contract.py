"""The reward server's HTTP contract, answered by the Ray Serve ingress (`RewardDeployment.__call__`) on a
real local Ray: bad requests are refused with 400 and what is wrong, never scored; 404 for an unknown
route, 413 for a body over the limit, GET …/health; a bearer token is required when configured (401) and
never echoed; a source's RewardError is 422 (not retried), any other exception 500 (retried);
`python -m rlhf_ray.rewards.server` serves until SIGTERM, then exits 0 and deletes its application.
The client's side of the contract, against stdlib servers: tests/unit/test_reward_http.py."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import ray
from ray import serve

from rlhf_ray.config import HttpSourceConfig, load_config
from rlhf_ray.rewards import HttpReward, RewardError
from rlhf_ray.rewards.serve import delete_apps, deploy
from rlhf_ray.rewards.server import token_digest
from rlhf_ray.toy import vowel_reward

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
VOWEL = "rlhf_ray.toy.task:vowel_reward"
PICKY = f"{__name__}:picky_reward"  # imported by the replicas: the driver's sys.path reaches Ray's workers
PROMPTS = [f"say: p{i}\n" for i in range(6)]
RESPONSES = ["aeiou", "boom", "zzz a", "x", "oo", "brr"]
METADATA = [{"stopped": i % 2 == 0} for i in range(6)]
FAST_RETRY = {"retries": 2, "backoff_s": 0.01}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()  # Serve's HTTP settings are the cluster's: one port for the module's Ray session


def picky_reward(prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """vowel_reward, refusing empty responses (FunctionReward turns the ValueError into a RewardError)."""
    if "" in responses:
        raise ValueError("cannot score an empty response")
    return vowel_reward(prompts, responses)


def _deploy(app: str, path: str, **http) -> str:
    """Serve function `path` (one replica) at http://127.0.0.1:PORT/<app>/score; `http`: the ingress's guard."""
    source = {"kind": "serve", "name": app, "path": path,
              "serve": {"source_kind": "function", "app": app, "route_prefix": f"/{app}", "http_port": PORT,
                        "replica_cpus": 0.5}}
    deploy(load_config(None, [f"reward.sources=[{json.dumps(source)}]"]), 0, path, 120, http=http)
    return f"http://127.0.0.1:{PORT}/{app}/score"


@pytest.fixture
def serve_app(ray_session):
    """`_deploy`, the applications deleted after the test."""
    started = []

    def start(app: str, path: str, **http) -> str:
        started.append(app)
        return _deploy(app, path, **http)

    yield start
    delete_apps(started)


@pytest.fixture(scope="module")
def vowel_url(ray_session):
    """vowel_reward served with a 200-byte request limit, for the whole module."""
    yield _deploy("vowel", VOWEL, max_request_bytes=200)
    delete_apps(["vowel"])


def request(url: str, body: bytes = b"", method: str = "POST") -> tuple[int, dict | str]:
    """(status, JSON answer, or the text of one that is not JSON) of one plain HTTP request."""
    req = urllib.request.Request(url, data=body if method == "POST" else None, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def scored_requests(score_url: str) -> int:
    """Requests the app's (single) replica has scored, from its health endpoint."""
    status, health = request(score_url.removesuffix("/score") + "/health", method="GET")
    assert status == 200 and health["status"] == "ok", health
    return health["requests"]


def client(url: str, **options) -> HttpReward:
    return HttpReward(HttpSourceConfig(url=url, **options), name="remote")


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
def test_bad_requests_are_refused_not_scored(vowel_url, body, words):
    before = scored_requests(vowel_url)
    status, answer = request(vowel_url, body)
    assert status == 400, answer
    for word in words:
        assert word in answer["error"]
    assert scored_requests(vowel_url) == before


def test_routes_health_and_size_limit(vowel_url):
    before = scored_requests(vowel_url)
    assert request(vowel_url, b'{"prompts": ["a"], "responses": ["ae"]}') == (200, {"scores": [1.0]})
    status, answer = request(vowel_url, json.dumps({"prompts": ["a" * 300], "responses": ["b"]}).encode())
    assert status == 413 and "exceeds the limit of 200" in answer["error"]
    status, answer = request(vowel_url.replace("/score", "/other"), b"{}")
    assert status == 404 and "use POST …/score or GET …/health" in answer["error"]
    assert request(vowel_url.replace("/score", "/nope"), method="GET")[0] == 404
    assert request(vowel_url, method="GET")[0] == 404  # scoring is POST only
    assert request(f"http://127.0.0.1:{PORT}/no_such_app/score", b"{}")[0] == 404  # Serve's proxy: no route
    status, health = request(vowel_url.replace("/score", "/health"), method="GET")
    assert status == 200 and health["status"] == "ok" and health["source"] == "vowel"
    assert health["requests"] == before + 1 and health["largest_batch"] >= 1  # only the valid request was scored


def test_bearer_token(serve_app, monkeypatch):
    url = serve_app("secure", VOWEL, token_sha256=token_digest("s3cret-token"))
    with pytest.raises(RewardError, match="HTTP 401: missing or wrong bearer token"):
        client(url, **FAST_RETRY).score(PROMPTS[:1], RESPONSES[:1], METADATA[:1])
    monkeypatch.setenv("RLHF_RAY_TEST_TOKEN", "wrong-token")
    wrong = HttpReward(HttpSourceConfig(url=url, token_env="RLHF_RAY_TEST_TOKEN", **FAST_RETRY))
    with pytest.raises(RewardError, match="HTTP 401") as info:
        wrong.score(PROMPTS[:1], RESPONSES[:1], METADATA[:1])
    assert "wrong-token" not in str(info.value) and "wrong-token" not in repr(wrong)
    assert wrong.counters["requests"] == 1  # a 401 is not retried
    monkeypatch.setenv("RLHF_RAY_TEST_TOKEN", "s3cret-token")
    right = HttpReward(HttpSourceConfig(url=url, token_env="RLHF_RAY_TEST_TOKEN"))
    assert right.score(PROMPTS, RESPONSES, METADATA) == vowel_reward(PROMPTS, RESPONSES)
    assert scored_requests(url) == 1  # the refused requests never reached the source


def test_source_errors_are_422_other_exceptions_500(serve_app, monkeypatch, tmp_path):
    # The replica's 1st and 2nd batches raise InjectedFault (rlhf_ray.faults, in RewardDeployment._score_samples):
    # an exception that is not a RewardError. One sample per request: one batch per request.
    monkeypatch.setenv("RLHF_RAY_FAULTS", "raise@reward.serve#1,raise@reward.serve#2")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))
    url = serve_app("picky", PICKY)
    once = client(url, retries=0)
    with pytest.raises(RewardError, match="after 1 attempts: HTTP 500: reward source 'picky' raised InjectedFault: "
                                          r"injected fault raise@reward\.serve#1"):
        once.score(PROMPTS[:1], RESPONSES[:1], METADATA[:1])
    assert once.counters["server_error"] == 1
    # a 500 may pass on a retry, and here does: the 2nd batch fails, the 3rd scores
    retried = client(url, **FAST_RETRY)
    assert retried.score(PROMPTS[:1], RESPONSES[:1], METADATA[:1]) == vowel_reward(PROMPTS[:1], RESPONSES[:1])
    assert retried.counters["server_error"] == 1 and retried.counters["retries"] == 1
    assert len(list((tmp_path / "faults").iterdir())) == 2
    # The source's own failure is a RewardError: 422 with its message, deterministic, so not retried.
    before = scored_requests(url)
    with pytest.raises(RewardError, match=r"HTTP 422: reward source 'picky' .*picky_reward raised ValueError: "
                                          "cannot score an empty response"):
        retried.score(PROMPTS[:3], ["ae", "", "o"], METADATA[:3])
    assert retried.counters["http_error"] == 1 and retried.counters["retries"] == 1
    assert scored_requests(url) == before + 1


def test_server_command_serves_and_stops_cleanly(ray_session):
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.rewards.server", "--source-kind", "function", "--source-path", VOWEL,
         "--app", "cli", "--route", "/cli", "--port", str(PORT), "--replica-cpus", "0.5",
         "--address", ray.get_runtime_context().gcs_address],
        cwd=ROOT, env=os.environ | {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line, deadline = "", time.monotonic() + 180
        while "serving reward source" not in line:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            line = proc.stdout.readline()
        url = f"http://127.0.0.1:{PORT}/cli/score"
        assert f"at {url} (POST) and /cli/health (GET); application 'cli'" in line, line
        assert client(url).score(PROMPTS, RESPONSES, METADATA) == vowel_reward(PROMPTS, RESPONSES)
        assert "cli" in serve.status().applications
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        assert "reward server stopped" in out
        assert "cli" not in serve.status().applications
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bad_sample_fails_only_its_own_request(ray_session):
    """Samples of concurrent requests share a batch; a sample the source rejects fails its request alone,
    named by its index in that request, while the other requests of the batch get their scores."""
    from ray import serve

    from rlhf_ray.config import RewardSourceConfig, ServeSourceConfig

    options = ServeSourceConfig(source_kind="function", app="picky_batch", replica_cpus=0.5, batch_wait_timeout_s=0.5)
    source = RewardSourceConfig(kind="serve", name="picky", path=PICKY, serve=options)
    deploy(load_config(None, [f"reward.sources=[{json.dumps(source.model_dump())}]"]), 0, PICKY, 120)
    try:
        handle = serve.get_app_handle("picky_batch")
        good = handle.score.remote(PROMPTS[:3], RESPONSES[:3], METADATA[:3])
        bad = handle.score.remote(PROMPTS[:3], ["ae", "io", ""], METADATA[:3])
        assert good.result(timeout_s=60) == vowel_reward(PROMPTS[:3], RESPONSES[:3])
        with pytest.raises(RewardError, match=r"\(sample 2\): .*cannot score an empty response") as failed:
            bad.result(timeout_s=60)
        assert failed.value.index == 2
        health = handle.counters.remote().result(timeout_s=60)
        assert health["largest_batch"] == 6  # both requests were in one batch
    finally:
        delete_apps(["picky_batch"])
