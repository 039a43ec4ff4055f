"""Hundreds of generated broken configs: each is rejected with a ConfigError naming a field, or is
accepted and then satisfies the invariants the runtime relies on. Nothing else may escape."""

import random

from rlhf_ray.config import ConfigError, RunConfig, build_config

VALUES = [None, -1, 0, 1, 2, 3, 7, 2.5, -0.5, 1e9, "x", "1e-3", True, False, [], {}, [1, 2], {"a": 1}, "toy", "auto"]


def _leaves(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, prefix + (key,))
    else:
        yield prefix


def _mutate(raw: dict, rng: random.Random, paths: list[tuple]) -> dict:
    for _ in range(rng.randint(1, 3)):
        path = list(rng.choice(paths))
        if rng.random() < 0.15:  # an unknown key next to a real one
            path[-1] = path[-1] + rng.choice(["_", "s", "x"])
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[path[-1]] = rng.choice(VALUES)
    return raw


def _check(raw: dict) -> bool:
    """True when accepted (and consistent), False when rejected with a clear ConfigError."""
    try:
        cfg = build_config(raw)
    except ConfigError as err:
        message = str(err)
        assert message.startswith("invalid config:") and ("." in message or "=" in message), message
        return False
    t = cfg.trainer  # accepted: the sizes the runtime derives are consistent
    if cfg.stage == "ppo":
        assert cfg.sequences_per_step % t.mini_batch_size == 0
        assert cfg.grad_accum_steps("policy") >= 1
        assert cfg.rollout.num_engines <= t.prompts_per_step
    assert cfg.model.toy.hidden_size % cfg.model.toy.num_heads == 0
    return True


def test_generated_configs_are_rejected_clearly_or_valid():
    defaults = RunConfig().model_dump(mode="json")
    paths = [p for p in _leaves(defaults) if p and p[0] != "pipeline"]
    outcomes = [_check(_mutate({}, random.Random(seed), paths)) for seed in range(500)]
    accepted = sum(outcomes)
    assert 10 < accepted < 400, accepted  # the generator exercises both outcomes
