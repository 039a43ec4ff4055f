"""Beyond one machine (issue 21), on a simulated Ray cluster: a head and three worker raylets on this
machine (`ray.cluster_utils.Cluster`), each with its own logical CPUs, object store and a custom resource
naming it. The roles are placed on chosen nodes by `placement.<role>.resources` / `strategy`, weights
cross nodes (object store and the gloo channel, verified by the probe every step), and whole nodes are
lost mid-run: killed (raylet and every process on it) or paused (SIGSTOP).

Every run of the module uses one config (toy PPO with a critic, the reference and reward model in
actors of their own, one torch thread per actor), so wherever the roles sit, the results equal those of
the uninterrupted run: the node-loss tests compare metrics and final weights with it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from rlhf_ray.checkpoint import CheckpointStore, verify
from rlhf_ray.config import load_config
from rlhf_ray.placement import PhaseError, PlacementError
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.ppo import PPOTrainer, run_ppo
from tests.integration.helpers import toy_overrides

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STEPS = 4
VOLATILE = ("time/", "perf/")
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                 "health_check_initial_delay_ms": 1000}


@pytest.fixture(scope="module")
def cluster():
    """Head (no CPUs: the driver only) + nodes a, b, c (NODES): a and b can host trained ranks ('trainer'),
    c carries the label rlhf-pool=serve; each has a resource naming it."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 150 * 2**20, "include_dashboard": False, "_system_config": SYSTEM_CONFIG})
    handles = {name: _add_node(c, name) for name in "abc"}
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    try:
        yield c, handles
    finally:
        ray.shutdown()
        c.shutdown()


NODES = {  # name → (CPUs, resources besides node_<name>, labels)
    "a": (3, {"trainer": 1}, {}), "b": (3, {"trainer": 1}, {}), "c": (3, {}, {"rlhf-pool": "serve"})}


def _add_node(c, name: str, like: str | None = None):
    """A worker raylet of this machine; `like`: with another node's CPUs, resources and labels (a stand-in)."""
    cpus, extra, labels = NODES[like or name]
    return c.add_node(num_cpus=cpus, object_store_memory=150 * 2**20, resources={f"node_{like or name}": 1, **extra},
                      labels=labels)


def _cfg(tmp_path, *extra: str):
    return load_config(CONFIGS / "toy_ppo.yaml", toy_overrides(
        tmp_path, f"trainer.total_steps={STEPS}", "trainer.prompts_per_step=8", "trainer.mini_batch_size=8",
        "trainer.micro_batch_size=4", "trainer.eval_prompts=8", "checkpoint.every=1", "checkpoint.keep_last=10",
        "placement.reference_in_policy=false", "placement.reward_in_driver=false", "placement.torch_threads=1",
        "placement.timeout_s=60", "trainer.timeout_s=60", "rollout.backend=hf", *extra))


SPREAD = (  # policy ranks on a and b, critic on b, the stateless roles on c (the engine by c's label)
    "placement.policy.num_workers=2", "placement.policy.strategy=strict_spread",
    "placement.policy.resources={trainer: 0.01}", "placement.critic.resources={node_b: 0.01}",
    "placement.rollout.labels={rlhf-pool: serve}", "placement.reference.resources={node_c: 0.01}",
    "placement.reward.resources={node_c: 0.01}")


def _node_names(handles) -> dict[str, str]:
    return {h.node_id: name for name, h in handles.items()}


def _rows(cfg) -> list[dict]:
    return [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(result: dict) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(f"{result['export_policy']}/model.safetensors")


def _assert_same(a: tuple, b: tuple) -> None:
    (rows_a, weights_a), (rows_b, weights_b) = a, b
    by_step = {r["step"]: r for r in rows_a}
    assert [r["step"] for r in rows_b] == list(range(1, STEPS + 1))
    for row in rows_b:
        for key, value in row.items():
            if not key.startswith(VOLATILE) and isinstance(value, float) and key in by_step[row["step"]]:
                assert value == pytest.approx(by_step[row["step"]][key], rel=1e-6, abs=1e-7), (row["step"], key)
    for name in weights_a:
        np.testing.assert_array_equal(weights_a[name], weights_b[name], err_msg=name)


@pytest.fixture(scope="module")
def spread_run(cluster, tmp_path_factory):
    """The reference: roles spread over the three nodes, weights through the object store."""
    cfg = _cfg(tmp_path_factory.mktemp("spread"), *SPREAD)
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        placed = dict(trainer.roles.node_of)
        result = trainer.fit()
    finally:
        trainer.close()
    return cfg, placed, result


def test_roles_sit_on_the_nodes_their_placement_names(cluster, spread_run):
    _, handles = cluster
    _, placed, _ = spread_run
    names = _node_names(handles)
    where = {role_rank: names[node] for role_rank, node in placed.items()}
    assert {where[("policy", 0)], where[("policy", 1)]} == {"a", "b"}  # strict_spread over the 'trainer' nodes
    assert where[("critic", 0)] == "b"
    assert where[("rollout", 0)] == where[("reference", 0)] == where[("reward", 0)] == "c"


@pytest.mark.parametrize("sync", ["object_store", "gloo"])
def test_weights_cross_nodes_and_the_probe_verifies_every_step(cluster, spread_run, tmp_path, sync):
    """The engine on node c gets the policy's weights from ranks on a and b; every step's probe (the
    engine's log-probs of a fixed sequence against the policy's) is within tolerance, and the gloo
    channel's run equals the object store's."""
    cfg, _, result = spread_run
    if sync == "object_store":
        rows = _rows(cfg)
    else:
        cfg = _cfg(tmp_path, *SPREAD, "rollout.weight_sync=gloo")
        other = run_ppo(cfg)
        rows = _rows(cfg)
        _assert_same((_rows(spread_run[0]), _weights(result)), (rows, _weights(other)))
    assert [r["sync/version"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["sync/probe_gap"] <= cfg.probe_tolerance for r in rows), [r["sync/probe_gap"] for r in rows]


def test_losing_the_stateless_node_moves_its_roles_and_the_run_equals_the_uninterrupted_one(cluster, spread_run,
                                                                                               tmp_path, monkeypatch):
    """Rollout engine, reference and reward model on node c; a second node able to host them (e, with
    the resource node_c) joins once they are placed; node c is lost in a reference call (a `node`
    fault: its raylet and every process on it SIGKILLed): Ray re-places their bundles on e, the actors
    restart there, the engine is re-synced, the reference's and reward model's calls are retried, and
    the run ends exactly as the uninterrupted one."""
    c, handles = cluster
    monkeypatch.setenv("RLHF_RAY_FAULTS", "node@reference.compute_logprobs#3")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))
    cfg = _cfg(tmp_path, *SPREAD)
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        before = dict(trainer.roles.node_of)
        handles["e"] = _add_node(c, "e", like="c")  # surviving capacity for c's roles
        c.wait_for_nodes()
        result = trainer.fit()
        trainer.roles._locate(60)
        after = dict(trainer.roles.node_of)
    finally:
        trainer.close()
    assert len(list((tmp_path / "faults").iterdir())) == 1  # the node fault fired
    names = _node_names(handles)
    assert [names[before[(r, 0)]] for r in ("rollout", "reference", "reward")] == ["c"] * 3
    assert [names.get(after[(r, 0)]) for r in ("rollout", "reference", "reward")] == ["e"] * 3
    assert {names[after[("policy", 0)]], names[after[("policy", 1)]]} == {"a", "b"}  # trained ranks untouched
    _assert_same((_rows(spread_run[0]), _weights(spread_run[2])), (_rows(cfg), _weights(result)))
    assert _drop_dead(c, handles) == ["c"]
    handles["c"] = handles.pop("e")  # e stands in for c in the next tests


def test_losing_a_trained_ranks_node_restarts_the_stage_from_its_checkpoint(cluster, spread_run, tmp_path,
                                                                             monkeypatch):
    """Policy rank 1's node is lost in step 3's update, with a spare node (d, like b) in the cluster: the
    stage restarts from step 2's checkpoint on the surviving nodes and ends with the uninterrupted run's
    weights. Then rank 1's node is lost the same way with no spare left: the restart cannot be placed,
    and the stage stops within placement.timeout_s saying so (refused, or granted on the node Ray had
    not yet marked dead and never started there), and step 2's checkpoint stays complete."""
    c, handles = cluster
    handles["d"] = _add_node(c, "d", like="b")
    c.wait_for_nodes()
    monkeypatch.setenv("RLHF_RAY_FAULTS", "node@policy[1].train#3")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults_spare"))
    cfg = _cfg(tmp_path / "spare", *SPREAD, "trainer.max_restarts=1", "deepspeed.timeout_s=30")
    result = run_ppo(cfg)
    assert len(list((tmp_path / "faults_spare").iterdir())) == 1  # the node fault fired
    assert len(_drop_dead(c, handles)) == 1  # rank 1's node, whichever of a, b, d it was
    _assert_same((_rows(spread_run[0]), _weights(spread_run[2])), (_rows(cfg), _weights(result)))

    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults_no_spare"))
    cfg = _cfg(tmp_path / "no_spare", *SPREAD, "trainer.max_restarts=1", "deepspeed.timeout_s=30",
               "placement.timeout_s=45")
    start = time.monotonic()
    with pytest.raises((PlacementError, PhaseError)) as err:
        run_ppo(cfg)
    assert time.monotonic() - start < 240
    text = str(err.value)  # refused at once, or granted on the node Ray has not yet marked dead and never started
    assert text.startswith("placement for policy not granted within 45s: asked 2 bundle(s) of {'CPU': 1.0, "
                           "'trainer': 0.01}, strategy strict_spread") or (
        text.startswith("FAILED phase=rendezvous role=policy step=init node=") and
        "no answer within 45s: 1 actor(s) restarting and not placed" in text), text
    latest = CheckpointStore(cfg.run_dir / "checkpoints", keep_last=10).latest_valid()
    assert latest is not None and latest.name == "step_00000002" and verify(latest) == []
    assert len(_drop_dead(c, handles)) == 1
    for name in "abc":  # the layout of the module's other tests
        if name not in handles:
            handles[name] = _add_node(c, name)
    c.wait_for_nodes()


def _drop_dead(c, handles: dict, timeout_s: float = 60) -> list[str]:
    """Wait until Ray has marked a killed node dead; drop the dead ones from `handles` (and from the
    cluster's own list, which `wait_for_nodes` counts); their names."""
    deadline = time.monotonic() + timeout_s
    while not (dead := [name for name, node in handles.items() if not _alive(node)]):
        assert time.monotonic() < deadline, "no node was marked dead"
        time.sleep(0.5)
    for name in dead:
        c.remove_node(handles.pop(name), allow_graceful=False)  # its processes are gone: only bookkeeping
    return dead


def _alive(node) -> bool:
    import ray

    return any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes())


def _processes_of(node) -> list[psutil.Process]:
    """The raylet of a simulated node and every process under it (its workers, their children)."""
    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return [raylet, *raylet.children(recursive=True)]


def test_a_paused_node_fails_the_phase_at_its_deadline_naming_the_node(cluster, tmp_path):
    """Node c (rollout engine, reference, reward model) is frozen with SIGSTOP after step 1: the next
    phase that needs it fails at trainer.timeout_s, naming phase, role, node and step."""
    c, handles = cluster
    cfg = _cfg(tmp_path, *SPREAD, "trainer.timeout_s=20")
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    frozen: list[psutil.Process] = []
    try:
        trainer.train_step(1)
        frozen = _processes_of(handles["c"])
        for proc in frozen:
            proc.send_signal(signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(PhaseError) as err:
            trainer.train_step(2)
        elapsed = time.monotonic() - start
    finally:
        for proc in frozen:
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.NoSuchProcess:
                pass
        trainer.close()
    text = str(err.value)
    assert text.startswith(f"FAILED phase={err.value.phase} role={err.value.role} step=2 node=")
    assert err.value.role in ("rollout", "reference", "reward") and "node_c" in err.value.node, text
    assert "no answer within 20s" in text and elapsed < 60, (text, elapsed)
    assert os.getpid() not in [p.pid for p in frozen]
