"""Reward sources on Ray Serve: replicas that batch requests, called in-cluster through a deployment
handle (no HTTP hop) or over HTTP from outside (ARCHITECTURE.md §5).

    reward:
      sources:
        - kind: serve
          name: rm
          path: /models/rm                 # the served source's path, as for kind=model
          serve: {source_kind: model, num_replicas: 2, replica_gpus: 1, route_prefix: /rm}

- `RewardDeployment` runs one reward source (model, function or judge, built by
  `build_reward_source` as in a reward worker) in each replica. Samples of every request that
  arrive together are scored in one call of up to `max_batch_size` samples (`serve.batch`), one call
  at a time per replica; the source runs off the replica's event loop. Serve checks every replica's
  liveness (`health_check_period_s`) and replaces one that died. On shutdown Serve stops routing to a
  replica and lets its requests in flight finish (`graceful_shutdown_timeout_s`).
- HTTP: with `route_prefix` the same replicas answer `POST <route_prefix>/score` in the contract of
  the `http` source (`{"prompts", "responses", "metadata"}` → `{"scores"}`; 400 bad request, 422 a
  bad value from the source, 500 any other failure) and `GET <route_prefix>/health`, through Serve's
  HTTP proxy (`http_host`, `http_port`), so an `http` source or any client outside the cluster plugs
  in. `python -m rlhf_ray.rewards.server` starts such an application on its own.
- The run deploys the applications of its `serve` sources before it reserves its actors
  (`start_apps`; Serve's replicas are not in the run's placement groups) and deletes them at the end
  (`delete_apps`), unless `serve.connect` names one already running, which it only calls.
- `ServeReward` is the source the run scores with: requests of `request_size` samples, all in flight
  at once (each replica admits `max_ongoing_requests`, the rest wait in Serve's queue), each with a
  deadline; a request whose replica died or timed out is sent again (`retries`, backoff), to any
  live replica. A source's own failure (a RewardError, any exception it raises) is not retried and
  keeps its kind: the reward contract holds, nothing is silently scored 0.
"""

from __future__ import annotations

import asyncio
import hmac
import threading
import time
from typing import TYPE_CHECKING, Any

import ray
from ray import serve

from rlhf_ray import faults
from rlhf_ray.rewards.base import RewardError, check_scores
from rlhf_ray.rewards.retry import backoff_s

if TYPE_CHECKING:
    from rlhf_ray.config import RewardSourceConfig, RunConfig, ServeSourceConfig

FAILURE_KINDS = ("replica_died", "timeout", "source_error")
MAX_BACKOFF_S = 10.0
DEPLOY_POLL_S = 0.5


def served_source(cfg: RewardSourceConfig) -> RewardSourceConfig:
    """The source each replica runs: `cfg` as its `serve.source_kind`, with its path, name and judge options."""
    return cfg.model_copy(update={"kind": cfg.serve.source_kind, "serve": None})


class RewardDeployment:
    """One replica: the reward source, batched scoring, HTTP ingress and a health check (module docstring)."""

    def __init__(self, cfg: RunConfig, index: int, path: str | None, http: dict | None = None):
        """`http`: the HTTP ingress's guard, {"token_sha256": hex or None, "max_request_bytes": n} (the CLI)."""
        from rlhf_ray.rewards.combine import build_reward_source
        from rlhf_ray.workers import judge_engine_factory, set_threads

        set_threads()  # RLHF_RAY_TORCH_THREADS, from the replica's environment (`application`)
        source_cfg = cfg.reward.sources[index]
        options = source_cfg.serve
        self.name = source_cfg.name or source_cfg.serve.app
        self.source = build_reward_source(served_source(source_cfg), path, cfg.model.trust_remote_code,
                                          cfg.reward.batch_size, judge_engine_factory(_with_engine_threads(cfg, options)))
        self._score_samples.set_max_batch_size(options.max_batch_size)
        self._score_samples.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self.stats = {"requests": 0, "samples": 0, "batches": 0, "largest_batch": 0}
        engine = getattr(self.source, "engine", None)  # a judge's generation engine (vLLM where installed)
        self.engine = type(engine).__name__ if engine is not None else None
        self.http = {"token_sha256": None, "max_request_bytes": 16 << 20} | (http or {})

    async def score(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        """Scores of one request, in order; its samples join whatever batch is forming. A sample the source
        rejects fails this request only, as a RewardError naming its index in the request."""
        self.stats["requests"] += 1
        results = await asyncio.gather(*(self._score_samples((p, r, m)) for p, r, m in zip(prompts, responses, metadata)))
        for index, result in enumerate(results):
            if isinstance(result, RewardError):
                raise RewardError(self.name, result.message, index, kind=result.kind)
        return list(results)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def _score_samples(self, samples: list[tuple[str, str, dict]]) -> list[float | RewardError]:
        """Scores of a batch of samples from any requests. When the source rejects the batch, each sample is
        scored alone, so one bad sample fails only its own request (its RewardError is its result)."""
        prompts, responses, metadata = (list(column) for column in zip(*samples))
        faults.fire("reward", "serve")  # reliability tests: crash@reward.serve#n kills this replica mid-request
        self.stats["batches"] += 1
        self.stats["samples"] += len(samples)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(samples))
        try:
            return await self._scores(prompts, responses, metadata)
        except RewardError:
            if len(samples) == 1:
                raise
            return [await self._alone(sample) for sample in samples]

    async def _scores(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        scores = await asyncio.to_thread(self.source.score, prompts, responses, metadata)
        return check_scores(self.name, scores, len(prompts))

    async def _alone(self, sample: tuple[str, str, dict]) -> float | RewardError:
        try:
            return (await self._scores(*([part] for part in sample)))[0]
        except RewardError as error:
            return error

    def counters(self) -> dict[str, Any]:
        """This replica's request and batch counts, its source's counters, and its engine's class."""
        return dict(self.stats) | getattr(self.source, "counters", {}) | {"engine": self.engine}

    async def __call__(self, request) -> Any:
        """HTTP ingress: POST …/score (the http reward contract), GET …/health."""
        from starlette.responses import JSONResponse

        from rlhf_ray.rewards.server import BadRequest, parse_score_request, token_digest

        path = request.url.path.rstrip("/")
        if request.method == "GET" and path.endswith("/health"):
            return JSONResponse({"status": "ok", "source": self.name, "engine": self.engine, **self.stats})
        if request.method != "POST" or not path.endswith("/score"):
            return JSONResponse({"error": f"no such route {request.method} {path!r}; use POST …/score or GET …/health"},
                                status_code=404)
        expected = self.http["token_sha256"]
        given = request.headers.get("authorization", "")
        if expected and not (given.startswith("Bearer ") and hmac.compare_digest(token_digest(given[7:]), expected)):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.http["max_request_bytes"]:  # refused before reading it
            return JSONResponse({"error": f"body of {declared} bytes exceeds the limit of "
                                          f"{self.http['max_request_bytes']}; send smaller batches"}, status_code=413)
        try:
            body = await request.body()
            if len(body) > self.http["max_request_bytes"]:
                raise BadRequest(f"body of {len(body)} bytes exceeds the limit of {self.http['max_request_bytes']}; "
                                 "send smaller batches", 413)
            prompts, responses, metadata = parse_score_request(body)
        except BadRequest as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        try:
            return JSONResponse({"scores": await self.score(prompts, responses, metadata)})
        except RewardError as error:
            return JSONResponse({"error": str(error)}, status_code=422)
        except Exception as error:  # noqa: BLE001 - answered 500: the client may retry
            return JSONResponse({"error": f"reward source '{self.name}' raised {type(error).__name__}: {error}"},
                                status_code=500)


def replica_threads(options: ServeSourceConfig) -> int:
    return max(1, int(options.replica_cpus))


def _with_engine_threads(cfg: RunConfig, options: ServeSourceConfig) -> RunConfig:
    """`cfg` with a judge's vLLM engine sized to the replica's CPUs (vLLM on CPU fixes its threads at start,
    and its attention kernels check them against torch's)."""
    vllm = cfg.rollout.vllm.model_copy(update={"threads": replica_threads(options)})
    return cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"vllm": vllm})})


def application(cfg: RunConfig, index: int, path: str | None, http: dict | None = None):
    """The bound Serve application of reward source `index` (kind=serve)."""
    options = cfg.reward.sources[index].serve
    deployment = serve.deployment(RewardDeployment, name=options.app)
    return deployment.options(**deployment_options(options)).bind(cfg, index, path, http)


def deployment_options(options: ServeSourceConfig) -> dict[str, Any]:
    """Serve deployment options from `serve:`: replicas, their resources and environment (thread counts,
    fault injection), admission, shutdown grace and health checks."""
    from rlhf_ray.placement import RoleSpec, actor_env

    spec = RoleSpec("reward", options.num_replicas, options.replica_cpus, options.replica_gpus, replica_threads(options))
    return dict(
        num_replicas=options.num_replicas,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus,
                           "runtime_env": {"env_vars": actor_env(spec)}},
        max_ongoing_requests=options.max_ongoing_requests,
        graceful_shutdown_timeout_s=options.timeout_s,
        health_check_period_s=5.0,
    )


def serve_start_options(options: ServeSourceConfig) -> dict[str, Any]:
    """`serve.start` arguments: Serve's HTTP proxy only where the source has an HTTP route."""
    if options.route_prefix is None:
        return {"proxy_location": "Disabled"}
    return {"http_options": {"host": options.http_host, "port": options.http_port}}


def start_apps(cfg: RunConfig, reward_paths: list[str | None], timeout_s: float) -> list[str]:
    """Deploy every `serve` source the run starts itself (not `connect`); → the application names."""
    started = []
    try:
        for index, (source, path) in enumerate(zip(cfg.reward.sources, reward_paths)):
            if source.kind == "serve" and not source.serve.connect:
                deploy(cfg, index, path, timeout_s)
                started.append(source.serve.app)
    except BaseException:
        delete_apps(started)
        raise
    return started


def deploy(cfg: RunConfig, index: int, path: str | None, timeout_s: float, http: dict | None = None) -> None:
    """Deploy source `index` and wait until every replica runs; a deadline, never a hang on missing resources."""
    options = cfg.reward.sources[index].serve
    name = cfg.reward.sources[index].name or options.app
    problem = _unplaceable(options)
    if problem:
        raise RuntimeError(f"reward source '{name}' on Ray Serve: {problem}")
    serve.start(**serve_start_options(options))  # the first start on a cluster sets its HTTP settings
    failure: list[BaseException] = []

    def run() -> None:
        try:
            serve.run(application(cfg, index, path, http), name=options.app, route_prefix=options.route_prefix)
        except BaseException as error:  # noqa: BLE001 - reported by the waiting thread
            failure.append(error)

    thread = threading.Thread(target=run, name=f"serve-deploy-{options.app}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive() or failure:
        serve.delete(options.app, _blocking=False)
        why = (f"{type(failure[0]).__name__}: {failure[0]}" if failure else
               f"not running after {timeout_s:g} s (placement.timeout_s): {options.num_replicas} replica(s) of "
               f"{options.replica_cpus:g} CPU / {options.replica_gpus:g} GPU may not fit the cluster's free resources")
        raise RuntimeError(f"reward source '{name}' on Ray Serve (application {options.app!r}): {why}")


def _unplaceable(options) -> str | None:
    """Why no node of the cluster could ever hold one replica (checked before deploying: Serve would wait
    for the resources forever, and an application whose replicas never started is slow to delete)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for key, field, amount in (("CPU", "replica_cpus", options.replica_cpus), ("GPU", "replica_gpus", options.replica_gpus)):
        largest = max((n.get(key, 0.0) for n in nodes), default=0.0)
        if amount > largest:
            return (f"serve.{field}={amount:g} but the largest node has {largest:g} {key}; "
                    f"lower serve.{field} or add a node that large")
    return None


def delete_apps(names: list[str]) -> None:
    """Delete the applications the run started (their replicas drain their requests first)."""
    if not names:
        return
    for name in names:
        serve.delete(name)


class ServeReward:
    """A reward source whose scores come from a Ray Serve application, through a deployment handle."""

    def __init__(self, cfg: RewardSourceConfig):
        self.options = cfg.serve
        self.name = cfg.name or cfg.serve.app
        self.counters: dict[str, int] = dict.fromkeys(("requests", "retries", *FAILURE_KINDS), 0)
        self._lock = threading.Lock()
        self.handle = self._handle()

    def __repr__(self) -> str:
        return f"ServeReward(name={self.name!r}, app={self.options.app!r})"

    def _handle(self):
        """The application's handle, waiting (with the request deadline) for one started elsewhere to exist."""
        deadline = time.monotonic() + self.options.timeout_s
        while True:
            try:
                return serve.get_app_handle(self.options.app)
            except Exception as error:  # noqa: BLE001 - Serve raises RayServeException for an unknown app
                if time.monotonic() > deadline:
                    raise RewardError(self.name, f"no Ray Serve application {self.options.app!r} is running "
                                                 f"({type(error).__name__}: {error}); start it (python -m "
                                                 "rlhf_ray.rewards.server --app …) or set serve.connect=false") from None
                time.sleep(DEPLOY_POLL_S)

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        size = self.options.request_size
        parts = [slice(start, start + size) for start in range(0, len(prompts), size)]
        pending = {i: self._send(prompts[s], responses[s], metadata[s]) for i, s in enumerate(parts)}
        out: dict[int, list[float]] = {}
        attempts = dict.fromkeys(pending, 0)
        while pending:
            i, response = next(iter(pending.items()))
            del pending[i]
            s = parts[i]
            try:
                out[i] = check_scores(self.name, response.result(timeout_s=self.options.timeout_s), len(prompts[s]))
            except Exception as error:  # noqa: BLE001 - sorted below: retried, or the source's own failure
                kind = self._kind(error)
                self._count(kind)
                if kind == "source_error" or attempts[i] == self.options.retries:
                    raise self._failure(error, kind, s, attempts[i] + 1) from None
                attempts[i] += 1
                self._count("retries")
                time.sleep(backoff_s(0.5, attempts[i], cap_s=MAX_BACKOFF_S))
                pending[i] = self._send(prompts[s], responses[s], metadata[s])
        return [score for i in range(len(parts)) for score in out[i]]

    def _send(self, prompts: list[str], responses: list[str], metadata: list[dict]):
        self._count("requests")
        return self.handle.score.remote(prompts, responses, metadata)

    def _kind(self, error: Exception) -> str:
        if isinstance(error, (TimeoutError, ray.exceptions.GetTimeoutError)):
            return "timeout"
        if isinstance(error, RewardError) or _cause(error) is not None:
            return "source_error"
        if isinstance(error, (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)):
            return "replica_died"
        return "replica_died" if "replica" in str(error).lower() or "actor" in str(error).lower() else "source_error"

    def _failure(self, error: Exception, kind: str, part: slice, attempts: int) -> RewardError:
        where = f"samples {part.start}..{part.start + self.options.request_size - 1} on application {self.options.app!r}"
        cause = _cause(error)
        if isinstance(cause, RewardError):
            index = None if cause.index is None else part.start + cause.index
            return RewardError(self.name, f"{where}: {cause.message}", index, kind=cause.kind)
        if cause is not None:
            return RewardError(self.name, f"{where}: the source raised {type(cause).__name__}: {cause}", kind="exception")
        return RewardError(self.name, f"{where}: failed after {attempts} attempt(s): {kind}: {error}",
                           kind="timeout" if kind == "timeout" else "exception")

    def _count(self, kind: str) -> None:
        with self._lock:
            self.counters[kind] += 1


def _cause(error: BaseException) -> BaseException | None:
    """The exception the source raised inside a replica (Ray wraps it in a RayTaskError), else None."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.cause if hasattr(error, "cause") else None
        if cause is not None and not isinstance(cause, (ray.exceptions.RayActorError,)):
            return cause
    return None
