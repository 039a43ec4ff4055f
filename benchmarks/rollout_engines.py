"""Rollout engines side by side: vLLM vs HF generate, tokens/s and weight-load cost per model size; the
whole weight-sync phase into vLLM per size and transport; the toy GRPO / PPO step breakdown per backend.

    python benchmarks/rollout_engines.py                 # 1M, 20M, ~100M params; ~10 min on 2 idle cores
    python benchmarks/rollout_engines.py --sizes 1M 20M --no-steps
    python benchmarks/rollout_engines.py --quick         # smoke run: small batch, 1M only
    python benchmarks/rollout_engines.py --no-generation --no-steps --sizes 20M   # the sync cost alone

Each (engine, size) runs in its own process (in-process vLLM fixes that process's threads and claims its
default torch.distributed group), on the same random Llama saved with `save_pretrained`, the same prompts
and the same batch: P prompts × n samples × exactly L new tokens (special tokens suppressed, so no row
stops early), temperature 1. Figures: median of `--repeats` timed calls after one warm-up call; weight
load = the engine taking the model's full state dict (vLLM: `reload_weights` through the worker
extension; HF: `copy_` into parameters), in seconds per 100 MB. Not a test: it prints figures, and the
JSON goes to runs/rollout_engines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # name → toy Llama sizes (head size 32 or 64: runnable by vLLM's CPU kernels)
    "1M": dict(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4),
    "20M": dict(hidden_size=512, intermediate_size=1536, num_layers=6, num_heads=8),
    "100M": dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12),
}


def measure(engine: str, size: str, model_dir: str, prompts: int, n: int, tokens: int, repeats: int,
            threads: int) -> dict:
    """In this process: build the engine, time generation and a full weight load."""
    import torch

    from rlhf_ray.models import load_causal_lm, load_tokenizer
    from rlhf_ray.rollout.base import SamplingParams

    torch.set_num_threads(threads)
    tokenizer = load_tokenizer(model_dir)
    t0 = time.perf_counter()
    if engine == "vllm":
        from rlhf_ray.rollout.vllm import VLLMOptions, VLLMRolloutEngine

        specials = sorted({*tokenizer.all_special_ids, tokenizer.eos_token_id, tokenizer.pad_token_id})
        rollout = VLLMRolloutEngine(VLLMOptions(model=model_dir, tokenizer=model_dir, max_model_len=64 + tokens,
                                                threads=threads, kv_cache_mb=2048),
                                    tokenizer.eos_token_id, tokenizer.pad_token_id, specials, len(tokenizer))
    else:
        from rlhf_ray.rollout.hf import HFRolloutEngine

        rollout = HFRolloutEngine(load_causal_lm(model_dir), tokenizer)
    startup = time.perf_counter() - t0
    ids = [tokenizer(f"<|user|>say {chr(97 + i % 26) * (1 + i % 5)}<|assistant|>")["input_ids"] for i in range(prompts)]
    params = SamplingParams(max_new_tokens=tokens, n=n, suppress_special_tokens=True)
    rollout.generate(ids, params, seed=0)  # warm-up
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        samples = rollout.generate(ids, params, seed=r + 1)
        times.append(time.perf_counter() - start)
    generated = int(samples.response_mask.sum())
    state = load_causal_lm(model_dir).state_dict()
    megabytes = sum(t.numel() * t.element_size() for t in state.values()) / 1e6
    loads = []
    for _ in range(3):
        start = time.perf_counter()
        rollout.load_weights(iter(state.items()))
        loads.append(time.perf_counter() - start)
    params_count = sum(t.numel() for t in state.values())
    return {"engine": engine, "size": size, "params_m": params_count / 1e6, "startup_s": startup,
            "generate_s": statistics.median(times), "tokens_per_s": generated / statistics.median(times),
            "weights_mb": megabytes, "load_s": statistics.median(loads),
            "load_s_per_100mb": statistics.median(loads) / megabytes * 100}


def child(args: argparse.Namespace) -> int:
    result = measure(args.engine, args.size, args.model_dir, args.prompts, args.n, args.tokens, args.repeats,
                     args.threads)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def run_child(engine: str, size: str, model_dir: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--size", size, "--model-dir", model_dir,
           "--prompts", str(args.prompts), "--n", str(args.n), "--tokens", str(args.tokens),
           "--repeats", str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{engine} {size} failed:\n{out.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def step_breakdown(config: str, backend: str, steps: int) -> dict:
    """Median per-phase times of a toy run (launch.py, local Ray) with one rollout backend."""
    out = tempfile.mkdtemp(prefix="rlhf_ray_engines_")
    cmd = [sys.executable, "launch.py", "--config", config, f"rollout.backend={backend}", f"trainer.output_dir={out}",
           "trainer.name=run", f"trainer.total_steps={steps}", "logging.progress_bar=false", "trainer.eval_every=0",
           "checkpoint.export_hf=false"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800,
                          env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    if done.returncode:
        raise RuntimeError(f"{config} {backend} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(l) for l in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()][2:]  # warm-up
    keys = [k for k in rows[0] if k.startswith("time/")]
    first, last = rows[0].get("reward/score_mean"), rows[-1].get("reward/score_mean")
    return {"config": Path(config).name, "backend": backend, **{k: statistics.median(r[k] for r in rows) for k in keys},
            "reward_first": first, "reward_last": last}


def sync_cost(size: str, transport: str, steps: int) -> dict:
    """The whole weight sync of a real toy GRPO run at this model size (DeepSpeed gather, transport, vLLM
    `reload_weights`, probe check): median `time/sync` over the steps after the first."""
    sizes = SIZES[size]
    out = tempfile.mkdtemp(prefix="rlhf_ray_sync_")
    cmd = [sys.executable, "launch.py", "--config", str(ROOT / "configs" / "toy_grpo.yaml"), "rollout.backend=vllm",
           f"rollout.weight_sync={transport}", f"trainer.output_dir={out}", "trainer.name=run",
           f"trainer.total_steps={steps}", "logging.progress_bar=false", "trainer.eval_every=0", "data.eval=null",
           "checkpoint.export_hf=false", "rollout.max_new_tokens=8", "trainer.prompts_per_step=2",
           "trainer.mini_batch_size=8", "trainer.micro_batch_size=8",
           *[f"model.toy.{k}={v}" for k, v in sizes.items()]]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800,
                          env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    if done.returncode:
        raise RuntimeError(f"sync {size} {transport} failed:\n{done.stderr[-3000:]}")
    rows = [json.loads(l) for l in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    from rlhf_ray.toy.models import save_toy_models

    mb = sum(p.numel() * 4 for p in _policy(save_toy_models(Path(out) / "m", **sizes).policy).parameters()) / 1e6
    sync = statistics.median(r["time/sync"] for r in rows)
    return {"size": size, "transport": transport, "weights_mb": mb, "sync_s": sync, "sync_s_per_100mb": sync / mb * 100,
            "step_s": statistics.median(r["time/step"] for r in rows), "probe_gap_max": max(r["sync/probe_gap"] for r in rows)}


def _policy(path: str):
    from rlhf_ray.models import load_causal_lm

    return load_causal_lm(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine", choices=["vllm", "hf"])
    parser.add_argument("--size")
    parser.add_argument("--model-dir")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="toy run steps per backend (2 warm-up)")
    parser.add_argument("--no-steps", action="store_true", help="skip the toy GRPO / PPO step breakdown")
    parser.add_argument("--no-sync", action="store_true", help="skip the end-to-end weight-sync cost per size")
    parser.add_argument("--no-generation", action="store_true", help="skip the tokens/s comparison")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1M, 8 prompts × 2 × 32 tokens, 1 repeat")
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.quick:
        args.sizes, args.prompts, args.n, args.tokens, args.repeats, args.steps = ["1M"], 8, 2, 32, 1, 4

    from rlhf_ray.toy.models import save_toy_models

    root = Path(tempfile.mkdtemp(prefix="rlhf_ray_engine_models_"))
    results = []
    for size in ([] if args.no_generation else args.sizes):
        model_dir = save_toy_models(root / size, **SIZES[size]).policy
        for engine in ("hf", "vllm"):  # alternating per size: both see the same machine state
            results.append(run_child(engine, size, model_dir, args))
            r = results[-1]
            print(f"{size:>5} {engine:>5}: {r['params_m']:.1f}M params, {r['tokens_per_s']:,.0f} tok/s, start "
                  f"{r['startup_s']:.1f} s, weight load {r['load_s_per_100mb']:.3f} s/100MB", flush=True)
    syncs = [] if args.no_sync else [sync_cost(size, transport, 5) for size in args.sizes
                                     for transport in ("object_store", "gloo")]
    steps = [] if args.no_steps else [step_breakdown(str(ROOT / "configs" / c), b, args.steps)
                                      for c in ("toy_grpo.yaml", "toy_ppo.yaml") for b in ("hf", "vllm")]
    if results:
        print(f"\n== generation: {args.prompts} prompts × {args.n} samples × {args.tokens} tokens, {args.threads} threads ==")
        print(f"{'size':>6} {'params':>8} {'HF tok/s':>10} {'vLLM tok/s':>11} {'vLLM/HF':>8} {'HF load':>14} {'vLLM load':>14}")
    for size in ([] if args.no_generation else args.sizes):
        hf, vl = (next(r for r in results if r["size"] == size and r["engine"] == e) for e in ("hf", "vllm"))
        print(f"{size:>6} {hf['params_m']:>7.1f}M {hf['tokens_per_s']:>10,.0f} {vl['tokens_per_s']:>11,.0f} "
              f"{vl['tokens_per_s'] / hf['tokens_per_s']:>7.2f}× {hf['load_s_per_100mb']:>9.3f} s/100MB "
              f"{vl['load_s_per_100mb']:>9.3f} s/100MB")
    if syncs:
        print("\n== weight sync into vLLM, whole phase (gather, transport, reload_weights, probe), median s ==")
        print(f"{'size':>6} {'transport':>13} {'MB':>8} {'sync s':>8} {'s/100MB':>8} {'step s':>8} {'sync share':>10}")
        for r in syncs:
            print(f"{r['size']:>6} {r['transport']:>13} {r['weights_mb']:>8.1f} {r['sync_s']:>8.3f} "
                  f"{r['sync_s_per_100mb']:>8.3f} {r['step_s']:>8.3f} {r['sync_s'] / r['step_s']:>9.1%}")
    if steps:
        phases = [k for k in steps[0] if k.startswith("time/")]
        print(f"\n== toy step breakdown (median s, {args.steps - 2} steps after 2 warm-up) ==")
        print(f"{'config':>14} {'backend':>8} " + " ".join(f"{p.removeprefix('time/'):>10}" for p in phases)
              + f" {'reward first → last':>22}")
        for s in steps:
            print(f"{s['config']:>14} {s['backend']:>8} " + " ".join(f"{s.get(p, float('nan')):>10.4f}" for p in phases)
                  + f" {s['reward_first']:>10.3f} → {s['reward_last']:.3f}")
    out = ROOT / "runs" / "rollout_engines.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"generation": results, "sync": syncs, "steps": steps, "args": vars(args)}, indent=2))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
