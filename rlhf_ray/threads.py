"""Torch threads per call: each node's thread budget split among the actors busy at once on it.

OpenMP threads that outnumber the cores do not slow a forward pass by the oversubscription
ratio but by ten times or more (its barriers spin: measured in docs/performance.md, "Threads").
So the driver, which knows which calls run at the same time, gives every call its share of its
node's budget: a lone rollout or update gets all of it, two concurrent forwards half each.
No Ray, no torch: a pure function of who is busy where.
"""

from __future__ import annotations

from collections import defaultdict

Worker = tuple[str, int]  # (role, rank)


def split_budget(busy: list[Worker], node_of: dict[Worker, str], budget: dict[str, int]) -> dict[Worker, int]:
    """Threads of each busy worker: its node's budget divided evenly among the busy workers on that
    node, at least 1 each; the remainder goes to the workers listed first (list the heaviest first)."""
    by_node: dict[str, list[Worker]] = defaultdict(list)
    for worker in dict.fromkeys(busy):
        by_node[node_of[worker]].append(worker)
    out: dict[Worker, int] = {}
    for node, workers in by_node.items():
        share, extra = divmod(budget[node], len(workers))
        for i, worker in enumerate(workers):
            out[worker] = max(1, share + (1 if i < extra else 0))
    return out
