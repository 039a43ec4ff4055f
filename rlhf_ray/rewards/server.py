"""Serve one reward source over HTTP on Ray Serve, for runs (or anything else) on other machines
(ARCHITECTURE.md §5). The replicas are `rlhf_ray.rewards.serve.RewardDeployment`, as for a run's
own `kind: serve` source; this command starts them on a Ray cluster (or a local Ray) and keeps
them up until SIGTERM / Ctrl-C, then deletes the application (replicas finish what is in flight).

    python -m rlhf_ray.rewards.server --source-kind model --source-path <dir> --replicas 2 [--port 8000]
    python -m rlhf_ray.rewards.server --source-kind function --source-path module:function --route /vowel

Endpoints (the contract `rlhf_ray.rewards.http.HttpReward` speaks), under `--route` (default /):
- `POST <route>/score`: `{"prompts": [str], "responses": [str], "metadata": [dict]}` (metadata
  optional) → 200 `{"scores": [float]}`; 400 bad JSON / missing or unknown keys / wrong types /
  length mismatch, 401 missing or wrong bearer token, 413 a body over the limit, 422 the source
  reported a bad value (RewardError: deterministic, not retried by the client), 500 any other
  exception in the source (retried). Errors are `{"error": "<message>"}`.
- `GET <route>/health`: 200 `{"status": "ok", "source": <name>, "requests": n, ...}`.
Runs on the same cluster reach the application without HTTP: `kind: serve` with
`serve: {connect: true, app: <--app>}`.

Decisions: binds 127.0.0.1 unless told otherwise; with `--token-env` every request must carry
`Authorization: Bearer <token>` (the replicas hold only the token's SHA-256, so the secret is in no
Ray config); Serve's HTTP settings are the cluster's, set by the first Serve start on it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading

REQUEST_KEYS = ("prompts", "responses", "metadata")
DEFAULT_MAX_REQUEST_BYTES = 16 << 20


class BadRequest(ValueError):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def parse_score_request(raw: bytes) -> tuple[list[str], list[str], list[dict]]:
    """(prompts, responses, metadata) from a `/score` body, or BadRequest saying what is wrong."""
    try:
        payload = json.loads(raw)
    except ValueError as error:
        raise BadRequest(f"body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise BadRequest(f"body must be a JSON object with keys {list(REQUEST_KEYS)}, got {type(payload).__name__}")
    missing = [k for k in ("prompts", "responses") if k not in payload]
    unknown = sorted(set(payload) - set(REQUEST_KEYS))
    if missing or unknown:
        raise BadRequest(f"missing keys {missing}, unknown keys {unknown}; expected {list(REQUEST_KEYS)} (metadata optional)")
    prompts, responses = payload["prompts"], payload["responses"]
    metadata = payload.get("metadata")
    metadata = [{}] * len(prompts) if metadata is None else metadata
    for key, value, kind in (("prompts", prompts, str), ("responses", responses, str), ("metadata", metadata, dict)):
        if not isinstance(value, list):
            raise BadRequest(f"'{key}' must be a list, got {type(value).__name__}")
        bad = next((i for i, item in enumerate(value) if not isinstance(item, kind)), None)
        if bad is not None:
            raise BadRequest(f"'{key}'[{bad}] must be a {kind.__name__}, got {type(value[bad]).__name__}")
    if not len(prompts) == len(responses) == len(metadata):
        raise BadRequest(f"lengths differ: {len(prompts)} prompts, {len(responses)} responses, {len(metadata)} metadata")
    return prompts, responses, metadata


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve one reward source over HTTP on Ray Serve (POST <route>/score, GET <route>/health).")
    parser.add_argument("--source-kind", required=True, choices=["model", "function", "judge"], help="as reward.sources[].kind")
    parser.add_argument("--source-path", required=True, help="model directory / hub id, or module:function")
    parser.add_argument("--name", help="source name reported by /health (default: derived from the path)")
    parser.add_argument("--app", default="rlhf_ray_reward", help="Ray Serve application name (runs connect to it by this name)")
    parser.add_argument("--route", default="/", help="HTTP route prefix (default /: POST /score)")
    parser.add_argument("--host", default="127.0.0.1", help="address Serve's HTTP proxy binds (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port of Serve's HTTP proxy")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the source")
    parser.add_argument("--replica-cpus", type=float, default=1.0)
    parser.add_argument("--replica-gpus", type=float, default=0.0)
    parser.add_argument("--max-batch-size", type=int, default=64, help="samples one replica scores in one call")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per model forward pass")
    parser.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_BYTES / 2**20, help="largest request body")
    parser.add_argument("--token-env", help="environment variable holding a bearer token that requests must carry")
    parser.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="deadline for the replicas to start")
    parser.add_argument("--trust-remote-code", action="store_true", help="let the model repo run its own code")
    args = parser.parse_args(argv)

    from rlhf_ray.config import ConfigError, load_config

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            print(f"--token-env {args.token_env}: that environment variable is unset or empty", file=sys.stderr)
            return 2
    source = {"kind": "serve", "path": args.source_path, **({"name": args.name} if args.name else {}),
              "serve": {"source_kind": args.source_kind, "app": args.app, "num_replicas": args.replicas,
                        "replica_cpus": args.replica_cpus, "replica_gpus": args.replica_gpus,
                        "max_batch_size": args.max_batch_size, "route_prefix": args.route,
                        "http_host": args.host, "http_port": args.port}}
    try:
        cfg = load_config(None, [f"reward.sources=[{json.dumps(source)}]", f"reward.batch_size={args.batch_size}",
                                 f"model.trust_remote_code={str(args.trust_remote_code).lower()}"])
    except (ConfigError, ValueError) as error:
        print(f"bad source: {error}", file=sys.stderr)
        return 2
    import ray

    from rlhf_ray.rewards.serve import delete_apps, deploy

    ray.init(address=args.address, include_dashboard=False)
    guard = {"token_sha256": token_digest(token) if token else None, "max_request_bytes": int(args.max_request_mb * 2**20)}
    deploy(cfg, 0, args.source_path, args.timeout_s, http=guard)
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        print(f"warning: listening on {args.host} without --token-env: anyone who can reach it may use it", file=sys.stderr)
    route = args.route.rstrip("/")
    print(f"serving reward source '{cfg.reward.sources[0].name or args.app}' ({args.replicas} replica(s)) at "
          f"http://{args.host}:{args.port}{route}/score (POST) and {route}/health (GET); application {args.app!r}",
          flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        delete_apps([args.app])
        ray.shutdown()
    print("reward server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
