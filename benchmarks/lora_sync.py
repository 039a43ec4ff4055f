"""LoRA weight sync: the merged model vs the adapter alone (model.lora.sync), measured in GRPO runs
on vLLM engines (issue 18, item 1).

    python benchmarks/lora_sync.py                     # 20M and 100M random Llamas, rank 16, 6 steps each
    python benchmarks/lora_sync.py --sizes 20M --steps 4

Each variant is a full GRPO run of configs/bench_grpo_gen.yaml (32 sequences × 128 new tokens) with
model.lora.rank=16 on every linear layer, one after the other in one Ray session:
- merged: every sync sends the merged weights (W + α/r·B·A, the full model) through the object store
  and vLLM reloads them all (`reload_weights`);
- adapter: every sync sends the adapter tensors; vLLM, started with `enable_lora`, registers it
  over the base weights it loaded at start, and every request runs with it.
Figures are medians over the steps after the first (the first adapter load builds vLLM's LoRA
state): sync time (the driver's whole sync: gather, put, load, probe check), rollout time
(generation through the adapter costs extra matrix products), step time, and the bytes one sync
sends. Not a test: it prints figures; JSON to runs/lora_sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIZES = {"20M": "{hidden_size: 512, intermediate_size: 1536, num_layers: 6, num_heads: 8, seed: 0}",
         "100M": "{hidden_size: 1024, intermediate_size: 2816, num_layers: 8, num_heads: 16, seed: 0}"}
SYNCS = ("merged", "adapter")


def run(size: str, sync: str, steps: int, prompts: int, rank: int) -> dict:
    from rlhf_ray.config import load_config
    from rlhf_ray.trainers.common import prepare_run
    from rlhf_ray.trainers.ppo import PPOTrainer

    out = tempfile.mkdtemp(prefix=f"lora_sync_{size}_{sync}_")
    cfg = load_config(ROOT / "configs/bench_grpo_gen.yaml", [
        f"model.toy={SIZES[size]}", f"model.lora.rank={rank}", f"model.lora.alpha={2 * rank}", f"model.lora.sync={sync}",
        f"trainer.total_steps={steps}", f"trainer.prompts_per_step={prompts}", f"trainer.mini_batch_size={prompts * 4}",
        f"trainer.micro_batch_size={prompts * 4}", f"trainer.output_dir={out}", "rollout.vllm.kv_cache_mb=512"])
    start = time.perf_counter()
    trainer = PPOTrainer(cfg, prepare_run(cfg))
    try:
        started = time.perf_counter() - start
        trainer.fit()
        history = list(trainer.logger.history)
        sent = _sync_bytes(trainer, cfg.adapter_sync)
    finally:
        trainer.close()
    later = history[1:] or history
    median = lambda key: statistics.median(h[key] for h in later)  # noqa: E731
    return {"size": size, "sync": sync, "start_s": started, "sync_s": median("time/sync"),
            "first_sync_s": history[0]["time/sync"], "rollout_s": median("time/rollout"),
            "step_s": median("time/step"), "sync_mb": sent / 2**20,
            "reward_last": history[-1]["reward/score_mean"]}


def _sync_bytes(trainer, adapter: bool) -> int:
    """Bytes one sync puts in the object store (rank 0's buckets)."""
    import ray

    probe = trainer.roles.probe_ids
    method = "send_adapter" if adapter else "send_to_object_store"
    sent = ray.get(trainer.roles.policy.call(lambda w: getattr(w, method).remote(probe)), timeout=300)
    return sum(v.nbytes for bucket in ray.get(sent[0][0], timeout=300) for v in bucket.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (4 samples each)")
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for size in args.sizes:
            for sync in SYNCS:
                rows.append(run(size, sync, args.steps, args.prompts, args.rank))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
    print(f"\n{'size':>5} {'sync':>8} {'MB/sync':>8} {'sync s':>7} {'1st sync':>8} {'rollout s':>9} {'step s':>7} {'start s':>7}")
    for r in rows:
        print(f"{r['size']:>5} {r['sync']:>8} {r['sync_mb']:8.2f} {r['sync_s']:7.3f} {r['first_sync_s']:8.3f} "
              f"{r['rollout_s']:9.3f} {r['step_s']:7.3f} {r['start_s']:7.1f}")
    for size in args.sizes:
        merged, adapter = (next(r for r in rows if r["size"] == size and r["sync"] == s) for s in SYNCS)
        print(f"{size}: adapter/merged  sync {adapter['sync_s'] / merged['sync_s']:.2f}×  "
              f"rollout {adapter['rollout_s'] / merged['rollout_s']:.2f}×  step {adapter['step_s'] / merged['step_s']:.2f}×")
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs/lora_sync.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
