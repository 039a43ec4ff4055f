"""Submitting to a remote Ray cluster over an unauthenticated channel is refused unless allowed."""

import os
import subprocess
from pathlib import Path

import pytest

from launch import check_ray_address

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("address", ["ray://10.1.2.3:10001", "http://ray-head.example:8265"])
def test_remote_plain_addresses_are_refused(address, monkeypatch):
    monkeypatch.delenv("ALLOW_INSECURE_RAY", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(SystemExit, match="refusing RAY_ADDRESS"):
        check_ray_address(address)


@pytest.mark.parametrize("address, env", [
    ("ray://127.0.0.1:10001", {}), ("http://localhost:8265", {}), ("10.1.2.3:6379", {}),  # in-job address
    ("ray://10.1.2.3:10001", {"RAY_AUTH_MODE": "token"}), ("http://10.1.2.3:8265", {"ALLOW_INSECURE_RAY": "1"}),
])
def test_loopback_in_job_token_or_explicit_override_pass(address, env, monkeypatch):
    monkeypatch.delenv("ALLOW_INSECURE_RAY", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    check_ray_address(address)


def test_submit_script_refuses_a_remote_plain_http_address():
    env = os.environ | {"RAY_ADDRESS": "http://203.0.113.9:8265", "RAY_AUTH_MODE": "disabled", "SKIP_CONFIG_CHECK": "1"}
    env.pop("ALLOW_INSECURE_RAY", None)
    out = subprocess.run(["bash", "cluster/submit.sh", "configs/toy_ppo.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "refusing to submit" in out.stderr
