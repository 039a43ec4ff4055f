"""Multi-turn episodes on vLLM: continuous scheduling (each turn its own request, environment steps on a
thread pool beside generation) against turn-by-turn lock-step (every turn of the batch one engine call,
then every environment step), on the same engine, prompts and seeds, alternating.

    python benchmarks/episodes.py                    # 1M-param model, 32 prompts × 4 episodes, 3 turns
    python benchmarks/episodes.py --size 20M --env-ms 0 20 100
    python benchmarks/episodes.py --quick

The environment stands for a tool: each step waits an exponentially distributed time with mean
`--env-ms` (seeded per episode and turn: the same waits in both modes), replies "ok", and ends the
episode after `--turns` turns. Responses are sampled at temperature 1 with EOS allowed, so turns have
different lengths (as real ones do). Figures: median seconds per batch of episodes over `--repeats`
after a warm-up, and the ratio lock-step / continuous. Not a test: it prints figures, and the JSON goes
to runs/episodes.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIZES = {"1M": dict(hidden_size=128, intermediate_size=512, num_layers=4, num_heads=4),
         "20M": dict(hidden_size=512, intermediate_size=1536, num_layers=6, num_heads=8)}


class LatencyEnv:
    """A tool-like environment: each step waits Exp(mean_ms) (seeded by episode and turn), replies "ok"."""

    def __init__(self, mean_ms: float, turns: int):
        self.mean_ms, self.turns = mean_ms, turns

    def reset(self, prompt: str, metadata: dict) -> str:
        self.episode, self.turn = metadata["episode"], 0
        return ""

    def step(self, action: str):
        from rlhf_ray.envs.base import StepResult

        self.turn += 1
        if self.mean_ms:
            time.sleep(random.Random(self.episode * 1000 + self.turn).expovariate(1000.0 / self.mean_ms))
        return StepResult("ok\n", 0.0, self.turn >= self.turns, {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, default="1M")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32, help="max new tokens per turn")
    parser.add_argument("--env-ms", type=float, nargs="+", default=[0.0, 20.0, 100.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="8 prompts, one latency, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.env_ms, args.repeats = 8, [20.0], 1

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from rlhf_ray.rollout.base import SamplingParams
    from rlhf_ray.rollout.multiturn import run_episodes
    from rlhf_ray.rollout.vllm import VLLMOptions, VLLMRolloutEngine
    from rlhf_ray.toy import save_toy_models
    from rlhf_ray.toy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_toy_models(tmp, max_position_embeddings=256, **SIZES[args.size])
        engine = VLLMRolloutEngine(VLLMOptions(model=paths.policy, tokenizer=paths.tokenizer, max_model_len=256,
                                               threads=args.threads),
                                   tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.all_special_ids, len(tokenizer))
        lockstep = SimpleNamespace(generate=engine.generate, pad_token_id=engine.pad_token_id)  # no submit: lock-step
        prompts = [tokenizer.encode(f"say: {i}\n", add_special_tokens=False) for i in range(args.prompts)]
        metadata = [{"episode": i} for i in range(args.prompts)]
        params = SamplingParams(max_new_tokens=args.tokens, n=args.n, logprobs=True)
        budget = args.turns * (args.tokens + 8)

        def run(view, env_ms: float) -> tuple[float, int]:
            start = time.perf_counter()
            samples, _ = run_episodes(view, tokenizer, prompts, [m | {} for m in metadata],
                                      lambda: LatencyEnv(env_ms, args.turns), params, seed=1, first_index=0,
                                      max_turns=args.turns, max_tokens=budget, threads=32)
            return time.perf_counter() - start, int(samples.response_mask.sum())

        results = []
        for env_ms in args.env_ms:
            run(engine, env_ms), run(lockstep, env_ms)  # warm-up
            times = {"continuous": [], "lockstep": []}
            for _ in range(args.repeats):
                for mode, view in (("continuous", engine), ("lockstep", lockstep)):
                    seconds, tokens = run(view, env_ms)
                    times[mode].append(seconds)
            row = {"env_ms": env_ms, "policy_tokens": tokens, **{m: statistics.median(t) for m, t in times.items()}}
            row["lockstep/continuous"] = row["lockstep"] / row["continuous"]
            results.append(row)
            print(f"env {env_ms:6.1f} ms/step  continuous {row['continuous']:.3f} s  lock-step {row['lockstep']:.3f} s  "
                  f"ratio {row['lockstep/continuous']:.2f}  ({tokens} policy tokens, "
                  f"{args.prompts}×{args.n} episodes × {args.turns} turns, {args.size})", flush=True)
    out = ROOT / "runs" / "episodes.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
