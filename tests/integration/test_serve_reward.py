"""Reward sources on Ray Serve (rlhf_ray.rewards.serve), on a real local Ray with real replicas: scores
through the deployment handle and through Serve's HTTP proxy (the http source's contract) equal the
function's; a replica killed mid-request is retried and nothing scores 0; a GRPO run scores with a
reward model on two replicas and deletes its application at the end; a deployment that cannot fit
fails by its deadline; `python -m rlhf_ray.rewards.server` serves an application that runs connect
to in-cluster, and HTTP clients reach with a bearer token."""

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

from rlhf_ray.config import HttpSourceConfig, JudgeSourceConfig, RewardSourceConfig, ServeSourceConfig, load_config
from rlhf_ray.rewards import FunctionReward, HttpReward
from rlhf_ray.rewards.base import RewardError
from rlhf_ray.rewards.serve import ServeReward, delete_apps, start_apps
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.ppo import PPOTrainer
from tests.integration.helpers import toy_overrides

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
VOWEL = "rlhf_ray.toy.task:vowel_reward"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = _free_port()  # Serve's HTTP settings are the cluster's: one port for the module's Ray session
PROMPTS = [f"say: p{i}\n" for i in range(40)]
RESPONSES = [("aeiou xyz q" * 3)[: i % 13] for i in range(40)]
METADATA = [{"stopped": i % 2 == 0} for i in range(40)]
DIRECT = FunctionReward(VOWEL).score(PROMPTS, RESPONSES, METADATA)


def _cfg(app: str, replica_cpus: float = 0.5, **serve_options):
    serve_cfg = ServeSourceConfig(source_kind="function", app=app, num_replicas=2, replica_cpus=replica_cpus,
                                  request_size=4, http_port=PORT, timeout_s=60, **serve_options)
    source = RewardSourceConfig(kind="serve", name=app, path=VOWEL, serve=serve_cfg)
    return load_config(CONFIGS / "toy_grpo.yaml", [f"reward.sources=[{json.dumps(source.model_dump())}]"])


def _apps() -> set[str]:
    return set(serve.status().applications)


def test_handle_and_http_scores_equal_the_function(ray_session):
    cfg = _cfg("vowel", route_prefix="/vowel", batch_wait_timeout_s=0.05)
    names = start_apps(cfg, [VOWEL], timeout_s=120)
    try:
        source = ServeReward(cfg.reward.sources[0])
        assert source.score(PROMPTS, RESPONSES, METADATA) == DIRECT
        assert source.counters["requests"] == 10 and source.counters["retries"] == 0
        # the http source (and any client outside the cluster) through Serve's HTTP proxy
        url = f"http://127.0.0.1:{PORT}/vowel/score"
        client = HttpReward(HttpSourceConfig(url=url, batch_size=7, max_concurrency=3), name="remote")
        assert client.score(PROMPTS, RESPONSES, METADATA) == DIRECT
        health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{PORT}/vowel/health", timeout=30).read())
        assert health["status"] == "ok" and health["samples"] > 0
        # a request that breaks the contract is refused, not scored
        request = urllib.request.Request(url, data=b'{"prompts": ["p"]}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400 and "missing keys ['responses']" in refused.value.read().decode()
    finally:
        delete_apps(names)
    assert "vowel" not in _apps()


def test_a_replica_killed_mid_request_is_retried_and_nothing_scores_zero(ray_session, tmp_path, monkeypatch):
    # the replica that reaches its 2nd batch exits at once (as if killed); the marker file makes it once per run
    monkeypatch.setenv("RLHF_RAY_FAULTS", "crash@reward.serve#2")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))
    cfg = _cfg("vowel_crash", max_batch_size=4, retries=3)
    names = start_apps(cfg, [VOWEL], timeout_s=120)
    try:
        source = ServeReward(cfg.reward.sources[0])
        assert source.score(PROMPTS, RESPONSES, METADATA) == DIRECT  # every sample, its own score
        assert source.counters["replica_died"] >= 1 and source.counters["retries"] >= 1
        assert len(list((tmp_path / "faults").iterdir())) == 1  # the crash did happen, once
    finally:
        delete_apps(names)


def test_a_deployment_that_cannot_fit_fails_at_once(ray_session):
    with pytest.raises(RuntimeError, match=r"'too_big'.*serve.replica_cpus=64 but the largest node has 8 CPU"):
        start_apps(_cfg("too_big", replica_cpus=64), [VOWEL], timeout_s=60)
    assert "too_big" not in _apps()  # nothing was deployed


def test_grpo_scores_with_a_reward_model_on_two_serve_replicas(ray_session, tmp_path, monkeypatch):
    # one replica is killed in the middle of the run (its 2nd batch; one request per batch): its requests go to the other, or to
    # the replica Serve starts in its place
    monkeypatch.setenv("RLHF_RAY_FAULTS", "crash@reward.serve#2")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))
    source = {"kind": "serve", "name": "rm", "path": "toy",
              "serve": {"source_kind": "model", "app": "toy_rm", "num_replicas": 2, "replica_cpus": 0.5,
                        "request_size": 8, "max_batch_size": 8}}
    cfg = load_config(CONFIGS / "toy_grpo.yaml", toy_overrides(
        tmp_path, "trainer.total_steps=2", "checkpoint.export_hf=false", f"reward.sources=[{json.dumps(source)}]"))
    assert cfg.reward_in_driver  # the driver only holds a handle: the replicas hold the model
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        assert "toy_rm" in _apps()
        trainer.fit()
        history = list(trainer.logger.history)
    finally:
        trainer.close()
    assert "toy_rm" not in _apps()  # the run deletes the application it started
    assert len(history) == 2
    for row in history:
        assert row["reward/rm_mean"] == row["reward/score_mean"] and row["reward/rm_mean"] != 0.0
    assert len(list((tmp_path / "faults").iterdir())) == 1  # the replica did die
    assert history[-1]["reward/rm/replica_died"] >= 1 and history[-1]["reward/rm/retries"] >= 1


def test_the_server_command_serves_an_application_runs_connect_to(ray_session, tmp_path):
    token = "serve-token-5d1e"
    env = {**os.environ, "RLHF_TEST_SERVE_TOKEN": token, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    address = ray.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf_ray.rewards.server", "--source-kind", "function", "--source-path", VOWEL,
         "--app", "external", "--route", "/ext", "--port", str(PORT), "--replicas", "1", "--replica-cpus", "0.5",
         "--token-env", "RLHF_TEST_SERVE_TOKEN", "--address", address],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = ""
        deadline = time.monotonic() + 180
        while "serving reward source" not in line:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            line = proc.stdout.readline()
        connect = RewardSourceConfig(kind="serve", name="ext",
                                     serve=ServeSourceConfig(source_kind="function", app="external", connect=True))
        assert ServeReward(connect).score(PROMPTS, RESPONSES, METADATA) == DIRECT  # in-cluster: the handle
        url = f"http://127.0.0.1:{PORT}/ext/score"
        os.environ["RLHF_TEST_SERVE_TOKEN"] = token
        try:
            authorised = HttpReward(HttpSourceConfig(url=url, token_env="RLHF_TEST_SERVE_TOKEN"), name="remote")
            assert authorised.score(PROMPTS, RESPONSES, METADATA) == DIRECT
        finally:
            del os.environ["RLHF_TEST_SERVE_TOKEN"]
        with pytest.raises(RewardError, match="HTTP 401"):
            HttpReward(HttpSourceConfig(url=url, retries=0), name="remote").score(PROMPTS[:2], RESPONSES[:2], METADATA[:2])
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and "reward server stopped" in out and token not in out
        assert "external" not in _apps()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_generative_judge_on_serve_runs_on_vllm(ray_session, tmp_path):
    """A judge served by Ray Serve generates with the run's rollout engine class (vLLM here), not HF generate."""
    judge = JudgeSourceConfig(mode="grade", max_new_tokens=4, on_unparseable="tie")
    source = RewardSourceConfig(kind="serve", name="judge", path="toy", judge=judge,
                                serve=ServeSourceConfig(source_kind="judge", app="judge", replica_cpus=1))
    cfg = load_config(CONFIGS / "toy_grpo.yaml", [f"trainer.output_dir={tmp_path}", "rollout.backend=vllm",
                                                   f"reward.sources=[{json.dumps(source.model_dump())}]"])
    toy = prepare_run(cfg).reward_paths[0]  # the toy policy, saved: the judge's model
    names = start_apps(cfg, [toy], timeout_s=300)
    try:
        scorer = ServeReward(cfg.reward.sources[0])
        scores = scorer.score(PROMPTS[:6], RESPONSES[:6], METADATA[:6])
        assert scores == [5.0] * 6  # a random toy judge: every grade unparseable, scored as the mid grade
        counters = serve.get_app_handle("judge").counters.remote().result(timeout_s=60)
        assert counters["engine"] == "VLLMRolloutEngine" and counters["verdicts"] == 6
    finally:
        delete_apps(names)
