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


# TEMPORARY (removed once the tests move to the Serve app): the former stdlib server.
import hmac  # noqa: E402
import logging  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402
from typing import Any  # noqa: E402

from rlhf_ray.rewards.base import RewardError, RewardSource, check_scores  # noqa: E402

logger = logging.getLogger(__name__)


class RewardServer:
    """`source` served at http://host:port; `port=0` picks a free port. Use `start()`/`stop()` or `with`."""

    def __init__(self, source: RewardSource, host: str = "127.0.0.1", port: int = 8000,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, token: str | None = None):
        self.source = source
        self.max_request_bytes = max_request_bytes
        self._token = token
        self._score_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "in_flight": 0, "max_in_flight": 0, "rejected": 0, "failed": 0}
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = False  # server_close() waits for requests in flight
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/score"

    @property
    def health_url(self) -> str:
        return self.url.removesuffix("/score") + "/health"

    def start(self) -> RewardServer:
        """Serve from a background thread (tests, notebooks)."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="reward-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, wait for requests in flight, close the socket."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def authorized(self, header: str | None) -> bool:
        if self._token is None:
            return True
        return hmac.compare_digest((header or "").encode(), f"Bearer {self._token}".encode())

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        with self._score_lock:
            try:
                scores = self.source.score(prompts, responses, metadata)
            except RewardError:
                raise
            except Exception as error:
                raise _SourceFailure(f"reward source '{self.source.name}' raised {type(error).__name__}: {error}") from error
        return check_scores(self.source.name, scores, len(prompts))

    @contextmanager
    def track(self):
        with self._stats_lock:
            self.stats["requests"] += 1
            self.stats["in_flight"] += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.stats["in_flight"])
        try:
            yield
        finally:
            with self._stats_lock:
                self.stats["in_flight"] -= 1

    def count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1


class _SourceFailure(RuntimeError):
    """The source raised something other than a RewardError (answered 500: may pass on a retry)."""


class _Handler(BaseHTTPRequestHandler):
    server_version = "rlhf_ray-reward/1"
    timeout = 60  # seconds a client may take to send its request

    def do_GET(self) -> None:
        app: RewardServer = self.server.app
        if self.path != "/health":
            self._send(404, {"error": f"no such path {self.path!r}; use GET /health or POST /score"})
            return
        self._send(200, {"status": "ok", "source": app.source.name, **app.stats})

    def do_POST(self) -> None:
        app: RewardServer = self.server.app
        with app.track():  # done before the answer is sent: a client that got it may send the next one at once
            status, body = self._answer(app)
        if status != 200:
            app.count("rejected" if status < 422 else "failed")
        self._send(status, body)

    def _answer(self, app: RewardServer) -> tuple[int, dict[str, Any]]:
        if self.path != "/score":
            return 404, {"error": f"no such path {self.path!r}; use POST /score"}
        if not app.authorized(self.headers.get("Authorization")):
            return 401, {"error": "missing or wrong bearer token"}
        try:
            prompts, responses, metadata = parse_score_request(self._read_body(app.max_request_bytes))
        except BadRequest as error:
            return error.status, {"error": str(error)}
        try:
            return 200, {"scores": app.score(prompts, responses, metadata)}
        except RewardError as error:
            return 422, {"error": str(error)}
        except _SourceFailure as error:
            logger.exception("reward source failed")
            return 500, {"error": str(error)}

    def _read_body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            raise BadRequest("a Content-Length header is required", 411)
        if not length.isdigit():
            raise BadRequest(f"Content-Length {length!r} is not a byte count")
        if int(length) > limit:
            raise BadRequest(f"body of {int(length)} bytes exceeds the limit of {limit}; send smaller batches", 413)
        return self.rfile.read(int(length))

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


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
