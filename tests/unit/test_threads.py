"""The per-phase thread plan: a node's budget split among the actors busy on it at once."""

from rlhf_ray.threads import split_budget

NODES = {("policy", 0): "a", ("reference", 0): "a", ("rollout", 0): "a", ("critic", 0): "b", ("policy", 1): "b"}


def test_a_lone_worker_gets_its_whole_node():
    assert split_budget([("rollout", 0)], NODES, {"a": 2, "b": 8}) == {("rollout", 0): 2}


def test_concurrent_workers_share_their_node_only():
    plan = split_budget([("policy", 0), ("reference", 0), ("critic", 0)], NODES, {"a": 2, "b": 8})
    assert plan == {("policy", 0): 1, ("reference", 0): 1, ("critic", 0): 8}


def test_remainder_goes_to_the_first_listed_and_everyone_gets_at_least_one():
    busy = [("policy", 0), ("reference", 0), ("rollout", 0)]
    assert split_budget(busy, NODES, {"a": 5}) == {("policy", 0): 2, ("reference", 0): 2, ("rollout", 0): 1}
    assert split_budget(busy, NODES, {"a": 2}) == {w: 1 for w in busy}  # more busy than cores: 1 each


def test_a_worker_listed_twice_counts_once():
    assert split_budget([("policy", 0), ("policy", 0)], NODES, {"a": 2}) == {("policy", 0): 2}
