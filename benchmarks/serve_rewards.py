"""A reward model on Ray Serve under a bounded burst of concurrent scoring requests (issue 19, item 5).

    python benchmarks/serve_rewards.py                  # 5M-param toy reward model, 1 and 2 replicas, 64 requests × 16
    python benchmarks/serve_rewards.py --requests 32 --samples 8 --replicas 1

For each replica count the same burst: `--requests` requests of `--samples` (prompt, response) pairs
sent at once, through the deployment handle (in-cluster) and through Serve's HTTP proxy (the `http`
source's client, `--requests` connections at most). Printed per path: samples/s over the burst, and
the p50 / p99 / max latency of one request from send to scores. The baseline in the same run: the
same samples scored by `ModelReward` in this process, one request after the other. Replicas get one
CPU each (`--replica-cpus`), so on a 2-core machine two replicas are the most that run side by side.
Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SIZES = {"tiny": {}, "5M": dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4)}


def burst(requests: list[tuple[list, list, list]], send) -> dict:
    """Send every request at once from a thread each; → samples/s and latency percentiles (s)."""
    latencies = []

    def one(request):
        start = time.perf_counter()
        scores = send(*request)
        latencies.append(time.perf_counter() - start)
        return scores

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = list(pool.map(one, requests))
    wall = time.perf_counter() - start
    latencies.sort()
    samples = sum(len(r[0]) for r in requests)
    return {"samples_per_s": samples / wall, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], "max_s": latencies[-1],
            "scores": [s for r in results for s in r]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16, help="samples per request")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--size", choices=list(SIZES), default="5M", help="the toy reward model's size")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve

    from rlhf_ray.config import HttpSourceConfig, load_config
    from rlhf_ray.rewards import HttpReward, ModelReward
    from rlhf_ray.rewards.serve import ServeReward, delete_apps, start_apps
    from rlhf_ray.toy import build_char_tokenizer
    from rlhf_ray.toy.models import build_reward_model

    model_dir = Path(tempfile.mkdtemp(prefix="serve_bench_rm_"))
    tokenizer = build_char_tokenizer()
    build_reward_model(tokenizer, seed=0, **SIZES[args.size]).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    n = args.requests * args.samples
    prompts = [f"say: {'abcde'[i % 5] * (1 + i % 4)}\n" for i in range(n)]
    responses = [("aeiou xyz " * 4)[: 8 + i % 32] for i in range(n)]
    metadata = [{} for _ in range(n)]
    requests = [(prompts[i:i + args.samples], responses[i:i + args.samples], metadata[i:i + args.samples])
                for i in range(0, n, args.samples)]

    import torch

    local = ModelReward(str(model_dir), name="rm")
    baselines = {}
    for threads in (1, os.cpu_count()):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        expected = [s for r in requests for s in local.score(*r)]
        baselines[threads] = n / (time.perf_counter() - start)
        print(f"baseline: ModelReward in this process ({threads} threads), one request after the other: "
              f"{baselines[threads]:,.0f} samples/s", flush=True)
    baseline = baselines[1]  # one replica's share: one CPU

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=max(4, int(max(args.replicas) * args.replica_cpus) + 1), include_dashboard=False,
             log_to_driver=False)
    rows = []
    try:
        for replicas in args.replicas:
            app = f"rm{replicas}"
            source = {"kind": "serve", "name": "rm", "path": str(model_dir),
                      "serve": {"source_kind": "model", "app": app, "num_replicas": replicas,
                                "replica_cpus": args.replica_cpus, "request_size": args.samples,
                                "route_prefix": f"/{app}", "http_port": port, "max_batch_size": 64}}
            cfg = load_config(None, [f"reward.sources=[{json.dumps(source)}]"])
            started = time.perf_counter()
            names = start_apps(cfg, [str(model_dir)], timeout_s=300)
            deploy_s = time.perf_counter() - started
            try:
                handle = ServeReward(cfg.reward.sources[0])
                burst(requests[:4], handle.score)  # warm-up: replicas' first forward
                client = HttpReward(HttpSourceConfig(url=f"http://127.0.0.1:{port}/{app}/score",
                                                     batch_size=args.samples, max_concurrency=args.requests), name="rm")
                for path, send in (("handle", handle.score), ("http", client.score)):
                    result = burst(requests, send)
                    close = max(abs(a - b) for a, b in zip(result.pop("scores"), expected))
                    rows.append({"replicas": replicas, "path": path, "deploy_s": deploy_s, "max_score_diff": close, **result})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                delete_apps(names)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\n{args.requests} requests × {args.samples} samples at once; baseline in-process: "
          + ", ".join(f"{v:,.0f} samples/s on {k} thread(s)" for k, v in baselines.items()) + " (× base: vs 1 thread)")
    print(f"{'replicas':>8} {'path':>6} {'samples/s':>10} {'× base':>7} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'deploy s':>8}")
    for r in rows:
        print(f"{r['replicas']:>8} {r['path']:>6} {r['samples_per_s']:>10,.0f} {r['samples_per_s'] / baseline:>7.2f} "
              f"{r['p50_s']:>7.3f} {r['p99_s']:>7.3f} {r['max_s']:>7.3f} {r['deploy_s']:>8.1f}")


if __name__ == "__main__":
    main()
