"""`kind: serve` reward sources, checked without Ray: what each `serve:` option becomes (deployment options,
Serve's HTTP settings, the source each replica runs), and the config errors for missing or misplaced
options. The behaviour on real replicas is in tests/integration/test_serve_reward.py."""

from __future__ import annotations

import pytest

from rlhf_ray.config import ConfigError, JudgeSourceConfig, RewardSourceConfig, ServeSourceConfig, load_config
from rlhf_ray.rewards.serve import deployment_options, serve_start_options, served_source


def test_deployment_options_follow_the_config():
    options = ServeSourceConfig(source_kind="model", app="rm", num_replicas=3, replica_cpus=2.5, replica_gpus=0.5,
                                max_ongoing_requests=7, timeout_s=45.0)
    out = deployment_options(options)
    assert out["num_replicas"] == 3 and out["max_ongoing_requests"] == 7 and out["graceful_shutdown_timeout_s"] == 45.0
    actor = out["ray_actor_options"]
    assert (actor["num_cpus"], actor["num_gpus"]) == (2.5, 0.5)
    env = actor["runtime_env"]["env_vars"]
    assert env["RLHF_RAY_TORCH_THREADS"] == "2" and env["OMP_NUM_THREADS"] == "2"  # threads = whole CPUs
    assert "CUDA_VISIBLE_DEVICES" not in env  # a GPU replica keeps the GPU Ray gives it


def test_http_proxy_only_with_a_route():
    assert serve_start_options(ServeSourceConfig()) == {"proxy_location": "Disabled"}
    routed = ServeSourceConfig(route_prefix="/rm", http_host="0.0.0.0", http_port=9123)
    assert serve_start_options(routed) == {"http_options": {"host": "0.0.0.0", "port": 9123}}
    with pytest.raises(ValueError, match=r"route_prefix='rm' must start with '/'"):
        ServeSourceConfig(route_prefix="rm")


def test_replicas_run_the_served_kind_with_the_sources_options():
    judge = JudgeSourceConfig(mode="compare", max_new_tokens=4)
    source = RewardSourceConfig(kind="serve", name="j", path="toy", judge=judge,
                                serve=ServeSourceConfig(source_kind="judge", batch_wait_timeout_s=0.2,
                                                        max_batch_size=8, request_size=5, retries=1))
    inner = served_source(source)
    assert (inner.kind, inner.path, inner.name, inner.serve) == ("judge", "toy", "j", None)
    assert inner.judge == judge and source.served_kind == "judge" and source.holds_model is False
    assert inner.holds_model  # the replica loads the judge


def test_config_errors_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match=r"kind=serve needs serve options"):
        RewardSourceConfig(kind="serve", path="toy")
    with pytest.raises(ValueError, match=r"kind=serve needs path .*a reward model directory"):
        RewardSourceConfig(kind="serve", serve=ServeSourceConfig(source_kind="model"))
    connected = RewardSourceConfig(kind="serve", serve=ServeSourceConfig(app="shared_rm", connect=True))
    assert connected.path is None and not connected.holds_model  # the application elsewhere holds the model
    with pytest.raises(ValueError, match=r"serve options are set but kind=model"):
        RewardSourceConfig(kind="model", path="toy", serve=ServeSourceConfig())
    with pytest.raises(ConfigError, match=r"reward_in_driver=true, but reward source\(s\) \['rm'\] hold a model"):
        load_config(None, ["placement.reward_in_driver=true", "reward.sources=[{kind: model, path: toy, name: rm}]"])
    assert load_config(None, ["reward.sources=[{kind: serve, path: toy, serve: {source_kind: model}}]"]).reward_in_driver
