"""Toy PPO step benchmark: per-phase time, throughput, peak memory per role, orchestration share.

    python benchmarks/ppo_step.py                       # 20 measured steps after 3 warm-up steps
    python benchmarks/ppo_step.py --steps 50 algo.epochs=2 placement.policy.num_workers=2

Runs the production code path (`PPOTrainer` on local Ray, every role an actor). Each worker
times its own compute methods; per phase the compute is the slowest worker of that phase (the
critical path), and the rest of the step's wall time is orchestration: Ray calls, serialisation,
object-store transfers, the driver's own bookkeeping. Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# the worker methods behind each phase's compute, per role
PHASE_METHODS = {
    "rollout": {"rollout": ["generate"]},
    "score": {"policy": ["compute_logprobs", "reference_logprobs"], "reference": ["compute_logprobs"], "critic": ["compute_values"],
              "reward": ["score"]},
    "update": {"policy": ["train"], "critic": ["train"]},
    "sync": {"policy": ["send_to_object_store", "send_to_channel"],
             "rollout": ["receive_from_object_store", "receive_from_channel"]},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "toy_ppo.yaml"))
    parser.add_argument("--steps", type=int, default=20, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from launch import init_ray
    from rlhf_ray.config import load_config
    from rlhf_ray.trainers.common import prepare_run
    from rlhf_ray.trainers.ppo import PPOTrainer

    out = tempfile.mkdtemp(prefix="rlhf_ray_bench_")
    total = args.steps + args.warmup
    cfg = load_config(args.config, [f"trainer.output_dir={out}", f"trainer.total_steps={total}",
                                    "logging.progress_bar=false", "logging.jsonl=false", *args.overrides])
    t0 = time.perf_counter()
    init_ray(cfg)
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    startup = time.perf_counter() - t0
    try:
        rows = []
        for step in range(1, total + 1):
            _usage(trainer)  # reset busy counters
            metrics = trainer.train_step(step)
            busy, peak = _usage(trainer)
            if step > args.warmup:
                rows.append((metrics, busy, peak))
        _report(cfg, rows, startup)
    finally:
        trainer.close()
        ray.shutdown()
    return 0


def _usage(trainer) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """{role: {method: max seconds over the role's workers}}, {role: peak MiB over its workers}."""

    busy, peak = {}, {}
    for role, group in trainer.roles.pools.items():
        results = group.get(group.call(lambda w: w.usage.remote()), "benchmark", "usage", 60)
        busy[role] = {}
        for methods, _ in results:
            for name, secs in methods.items():
                busy[role][name] = max(busy[role].get(name, 0.0), secs)
        peak[role] = max(mib for _, mib in results)
    return busy, peak


def _compute(busy: dict[str, dict[str, float]], phase: str) -> float:
    # a role's methods of one phase run one after another in its process; roles run side by side
    return max((sum(busy.get(role, {}).get(m, 0.0) for m in ms) for role, ms in PHASE_METHODS[phase].items()), default=0.0)


def _report(cfg, rows, startup: float) -> None:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    step = [m["time/step"] for m, _, _ in rows]
    print(f"\n== toy PPO step benchmark: {len(rows)} measured steps, {cfg.sequences_per_step} sequences × "
          f"≤{cfg.rollout.max_new_tokens} new tokens, policy ranks {cfg.placement.policy.num_workers}, "
          f"ZeRO-{cfg.deepspeed.zero_stage}, sync {cfg.rollout.weight_sync} ==")
    print(f"start-up (ray.init + actors + DeepSpeed): {startup:.1f} s")
    print(f"step time: median {med(step) * 1e3:.1f} ms, min {min(step) * 1e3:.1f}, max {max(step) * 1e3:.1f}")
    print(f"{'phase':<12}{'wall ms':>10}{'compute ms':>12}{'overhead ms':>13}")
    compute_total = []
    for phase in ("prompts", "rollout", "score", "advantages", "update", "sync"):
        wall = med([m[f"time/{phase}"] for m, _, _ in rows])
        if phase in PHASE_METHODS:
            comp = med([_compute(b, phase) for _, b, _ in rows])
        else:
            comp = wall  # driver-side work: data indexing and pure math
        print(f"{phase:<12}{wall * 1e3:>10.1f}{comp * 1e3:>12.1f}{(wall - comp) * 1e3:>13.1f}")
    for m, b, _ in rows:
        compute_total.append(sum(_compute(b, p) for p in PHASE_METHODS) + m["time/prompts"] + m["time/advantages"])
    overhead = [1 - c / m["time/step"] for c, (m, _, _) in zip(compute_total, rows)]
    print(f"orchestration share of step time (median): {med(overhead) * 100:.1f}%")
    print(f"tokens/s (prompt+response, per step time): {med([m['perf/tokens_per_s'] for m, _, _ in rows]):.0f}")
    print(f"response tokens/s during rollout: {med([m['perf/response_tokens_per_s'] for m, _, _ in rows]):.0f}")
    peaks = rows[-1][2]
    print("peak resident memory per role (MiB): " + ", ".join(f"{r} {v:.0f}" for r, v in sorted(peaks.items())))


if __name__ == "__main__":
    sys.exit(main())
