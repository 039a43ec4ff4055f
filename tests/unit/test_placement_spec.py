"""placement.<role> → RoleSpec: strategy, custom resources and labels carried to the placement group."""

from rlhf_ray.config import load_config
from rlhf_ray.placement import PhaseError, RoleSpec, role_spec


def test_a_roles_placement_options_reach_its_spec():
    cfg = load_config(None, ["placement.policy.num_workers=2", "placement.policy.strategy=strict_spread",
                             "placement.policy.resources={trainer: 0.01, node_a: 0.5}", "placement.rollout.labels={pool: serve}",
                             "placement.rollout.cpus=2", "placement.rollout.gpus=0"])
    policy = role_spec("policy", cfg.placement.policy, torch_threads=3)
    assert policy == RoleSpec("policy", 2, 1.0, 0.0, 3, "strict_spread", (("node_a", 0.5), ("trainer", 0.01)), ())
    engines = role_spec("rollout", cfg.placement.rollout, num_workers=4)
    assert (engines.num_workers, engines.cpus, engines.strategy, engines.labels) == (4, 2.0, "pack", (("pool", "serve"),))
    assert hash(engines)  # frozen and hashable: specs key dicts


def test_a_phase_error_names_the_node_when_known_and_survives_pickling():
    import pickle

    err = PhaseError("score", "reference", 2, "no answer within 20s", node="ab12cd34 (10.0.0.5, node_c)")
    assert str(err) == "FAILED phase=score role=reference step=2 node=ab12cd34 (10.0.0.5, node_c) cause=no answer within 20s"
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.node, back.restartable) == (str(err), err.node, True)
    assert str(PhaseError("update", "policy", 3, "boom")) == "FAILED phase=update role=policy step=3 cause=boom"


def test_a_local_ray_gets_the_resources_and_labels_a_multi_node_config_asks_for():
    import launch

    cfg = load_config(None, ["placement.policy.num_workers=2", "placement.policy.resources={trainer: 0.5}",
                             "placement.critic.resources={trainer: 0.25, node_b: 1}", "rollout.num_engines=2",
                             "placement.rollout.resources={serve: 0.1}", "placement.rollout.labels={pool: serve, zone: x}",
                             "placement.reward.labels={zone: y}"])
    resources, labels = launch.local_node_placement(cfg)
    assert resources == {"trainer": 2 * 0.5 + 0.25, "node_b": 1.0, "serve": 2 * 0.1}
    assert labels == {"pool": "serve"}  # zone: x or y cannot both hold on one node; left to the placement error


def test_every_roles_strategy_resources_and_labels_reach_its_spec():
    cfg = load_config(None, [
        "placement.reference_in_policy=false",
        "placement.policy.strategy=spread", "placement.policy.resources={pool_0: 0.5}", "placement.policy.labels={zone: z0}",
        "placement.critic.strategy=strict_spread", "placement.critic.resources={pool_1: 0.5}", "placement.critic.labels={zone: z1}",
        "placement.reference.strategy=strict_pack", "placement.reference.resources={pool_2: 0.5}",
        "placement.reference.labels={zone: z2}",
        "placement.reward.strategy=spread", "placement.reward.resources={pool_3: 0.5}", "placement.reward.labels={zone: z3}",
        "placement.rollout.strategy=spread", "placement.rollout.resources={pool_4: 0.5}", "placement.rollout.labels={zone: z4}"])
    strategies = ["spread", "strict_spread", "strict_pack", "spread", "spread"]
    for i, role in enumerate(("policy", "critic", "reference", "reward", "rollout")):
        spec = role_spec(role, getattr(cfg.placement, role))
        assert (spec.strategy, spec.resources, spec.labels) == (strategies[i], ((f"pool_{i}", 0.5),), (("zone", f"z{i}"),))


def test_the_sync_probe_gap_is_relative_for_large_log_probs_and_absolute_near_zero():
    import math

    import numpy as np
    import pytest

    from rlhf_ray.trainers.ppo import probe_gap

    policy = np.array([-0.5, -2.0, -20.0])
    assert probe_gap(policy + [1e-5, 0, 0], policy) == pytest.approx(1e-5, rel=1e-9)  # |log-prob| < 1: absolute
    # the soak run's false alarm: 1.6e-4 at a log-prob of about -16 is 1e-5 relative, far inside 1e-4
    assert probe_gap(policy + [0, 0, 1.6e-4], policy) == pytest.approx(1.6e-4 / 20.0, rel=1e-9)
    assert probe_gap(policy + [0, 0.3, 0], policy) == pytest.approx(0.15)  # stale weights still fail
    assert math.isnan(probe_gap(np.array([math.nan, -2.0, -20.0]), policy))
