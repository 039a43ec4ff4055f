"""Placement groups, torch.distributed rendezvous, and typed fan-out/gather over a role's actors.

A role is a `WorkerPool`: N Ray actors of one plain worker class, each pinned to a bundle
`{"CPU": c, "GPU": g}` of a placement group (g = 0 on CPU-only Ray). Roles listed together in
`placement.colocate` share one placement group: each keeps its own CPUs in a bundle and they split its GPU.
Every wait has a deadline; a failure is a `PhaseError` whose message is one line naming the phase,
role, step and cause. A placement the cluster cannot satisfy fails within its deadline naming what
was asked and what the cluster has.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Generic, TypeVar

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

W = TypeVar("W")


class PhaseError(RuntimeError):
    """A phase failed or missed its deadline. `restartable`: a restart from the last checkpoint may
    get past it (a dead or hung rank), unlike e.g. repeated non-finite values."""

    def __init__(self, phase: str, role: str, step: int | str, cause: str, restartable: bool = True,
                 node: str | None = None):
        self.phase, self.role, self.step, self.cause, self.restartable = phase, role, step, cause, restartable
        self.node = node  # the node(s) of the actors that failed or did not answer, when known
        where = f" node={node}" if node else ""
        super().__init__(f"FAILED phase={phase} role={role} step={step}{where} cause={cause}")

    def __reduce__(self):
        return (PhaseError, (self.phase, self.role, self.step, self.cause, self.restartable, self.node))


class PlacementError(RuntimeError):
    """The cluster cannot host the requested actors."""


@dataclass(frozen=True)
class RoleSpec:
    """Resources of one role: `num_workers` actors of `cpus`/`gpus` (and custom `resources`) each, placed
    by `strategy` on nodes carrying `labels`."""

    role: str
    num_workers: int
    cpus: float
    gpus: float
    torch_threads: int | None = None
    strategy: str = "pack"  # placement.<role>.strategy
    resources: tuple[tuple[str, float], ...] = ()  # custom Ray resources per actor
    labels: tuple[tuple[str, str], ...] = ()  # node labels each actor's node must carry

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, math.ceil(self.cpus))


def role_spec(role: str, res: Any, num_workers: int | None = None, torch_threads: int | None = None) -> RoleSpec:
    """The RoleSpec of `placement.<role>` (a RoleResources); `num_workers` overrides its count (engines)."""
    return RoleSpec(role, res.num_workers if num_workers is None else num_workers, res.cpus, res.gpus, torch_threads,
                    res.strategy, tuple(sorted(res.resources.items())), tuple(sorted(res.labels.items())))


def wait(refs: list[ray.ObjectRef], *, phase: str, role: str, step: int | str, timeout_s: float) -> list[Any]:
    """`ray.get` with a deadline; any failure becomes one `PhaseError` line."""
    try:
        return ray.get(refs, timeout=timeout_s)
    except GetTimeoutError:
        _, late = ray.wait(refs, num_returns=len(refs), timeout=0)
        actors = [ref.task_id().actor_id().hex() for ref in late]
        states = [_actor_record(a).get("State") for a in dict.fromkeys(actors)]
        unplaced = sum(state in ("PENDING_CREATION", "RESTARTING") for state in states)
        why = (f": {unplaced} actor(s) restarting and not placed (their node was lost and no alive node has room for "
               f"their bundle: add capacity)") if unplaced else ""
        raise PhaseError(phase, role, step, f"no answer within {timeout_s:g}s{why}", node=nodes_of(actors)) from None
    except RayTaskError as err:
        cause = err.cause if err.cause is not None else err
        raise PhaseError(phase, role, step, f"{type(cause).__name__}: {_first_line(cause)}") from err
    except RayActorError as err:
        actor = getattr(err, "actor_id", None)
        raise PhaseError(phase, role, step, f"actor died: {_first_line(err)}",
                         node=nodes_of([actor]) if actor else None) from err


def nodes_of(actor_ids: list[str]) -> str | None:
    """The nodes (described) the given actors run on, or last ran on; None when none is known."""
    nodes: list[str] = []
    for actor_id in dict.fromkeys(actor_ids):
        address = _actor_record(actor_id).get("Address") or {}
        node_id = address.get("NodeID") if address.get("IPAddress") else None  # '' while not placed
        if node_id and node_id not in nodes:
            nodes.append(node_id)
    return "; ".join(describe_node(n) for n in nodes) or None


def _actor_record(actor_id: str) -> dict[str, Any]:
    """The GCS actor table's row (state, address) of an actor; {} when it cannot be read."""
    from ray._private.state import state  # works without the dashboard

    try:
        return state.actor_table(actor_id) or {}
    except Exception:  # noqa: BLE001 - naming the node is best effort; the failure itself is reported
        return {}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[-1] if text else type(err).__name__


def reserve(specs: list[RoleSpec], timeout_s: float) -> PlacementGroup:
    """One placement group shared by `specs` (one role, or a colocated group); bundles sized to fit each."""
    n = max(s.num_workers for s in specs)
    bundle = {"CPU": sum(s.cpus for s in specs)}  # CPUs are not shared: each colocated actor keeps its own
    gpus = max(s.gpus for s in specs)  # the GPU is shared: each colocated actor takes gpus / len(specs)
    if gpus > 0:
        bundle["GPU"] = gpus
    for spec in specs:  # custom resources, like CPUs, each colocated actor keeps its own
        for name, amount in spec.resources:
            bundle[name] = bundle.get(name, 0.0) + amount
    labels = dict(specs[0].labels)  # colocated roles share strategy and labels (a config rule)
    pg = placement_group([dict(bundle) for _ in range(n)], strategy=specs[0].strategy.upper(),
                         bundle_label_selector=[dict(labels) for _ in range(n)] if labels else None)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        roles = "+".join(s.role for s in specs)
        where = f", strategy {specs[0].strategy}" + (f", on nodes labelled {labels}" if labels else "")
        custom = sorted(k for k in bundle if k not in ("CPU", "GPU"))
        raise PlacementError(
            f"placement for {roles} not granted within {timeout_s:g}s: asked {n} bundle(s) of {bundle}{where}; "
            f"cluster total {_resources(ray.cluster_resources(), custom)}, available "
            f"{_resources(ray.available_resources(), custom)} over {len(alive_nodes())} node(s). Lower "
            f"placement.<role>.num_workers/cpus/gpus, relax its strategy/resources/labels, or add nodes.")
    return pg


def _resources(res: dict[str, float], custom: list[str] = ()) -> dict[str, float]:
    return {k: v for k, v in res.items() if k in ("CPU", "GPU", "memory", *custom)}


def alive_nodes() -> list[dict[str, Any]]:
    return [n for n in ray.nodes() if n.get("Alive")]


def describe_node(node_id: str) -> str:
    """'<id8> (<ip>[, <custom resources>][, <labels>])' of a Ray node, as failures name it."""
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            custom = sorted(k for k in node.get("Resources", {}) if k not in ("CPU", "GPU", "memory", "object_store_memory")
                            and not k.startswith(("node:", "accelerator_type:")))
            labels = {k: v for k, v in (node.get("Labels") or {}).items() if not k.startswith("ray.io/")}
            extra = "".join(f", {x}" for x in (", ".join(custom), ", ".join(f"{k}={v}" for k, v in labels.items())) if x)
            state = "" if node.get("Alive") else ", dead"
            return f"{node_id[:8]} ({node.get('NodeManagerAddress', '?')}{extra}{state})"
    return node_id[:8]


class WorkerPool(Generic[W]):
    """N actors of one role. Calls are typed: `pool.call(lambda w: w.method.remote(...))`."""

    def __init__(self, spec: RoleSpec, worker_cls: type[W], pg: PlacementGroup, gpu_share: float,
                 make_args: Callable[[int], tuple], timeout_s: float, max_restarts: int = 0,
                 max_task_retries: int = 0, actor_options: dict[str, Any] | None = None):
        """`actor_options`: class-level Ray options (`ray.remote(**actor_options)`), e.g. concurrency groups."""
        self.spec = spec
        self.timeout_s = timeout_s
        actor_cls = ray.remote(**actor_options)(worker_cls) if actor_options else ray.remote(worker_cls)
        self.workers = [
            actor_cls.options(
                num_cpus=spec.cpus,
                num_gpus=spec.gpus * gpu_share,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
                **_runtime_env(spec),
                max_restarts=max_restarts,
                max_task_retries=max_task_retries,
                name=None,
            ).remote(*make_args(rank))
            for rank in range(spec.num_workers)
        ]

    @property
    def role(self) -> str:
        return self.spec.role

    def __len__(self) -> int:
        return len(self.workers)

    def call(self, fn: Callable[[Any], ray.ObjectRef]) -> list[ray.ObjectRef]:
        """Fan out the same call to every worker."""
        return [fn(w) for w in self.workers]

    def call_each(self, fn: Callable[[Any, Any], ray.ObjectRef], items: list[Any]) -> list[ray.ObjectRef]:
        """Fan out one call per worker with its own item (e.g. its data shard)."""
        return [fn(w, item) for w, item in zip(self.workers, items, strict=True)]

    def get(self, refs: list[ray.ObjectRef], phase: str, step: int | str, timeout_s: float | None = None) -> list[Any]:
        return wait(refs, phase=phase, role=self.role, step=step, timeout_s=timeout_s or self.timeout_s)


QUIET_ENV = {  # no per-actor download/load progress bars in the job log
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
}


def actor_env(spec: RoleSpec) -> dict[str, str]:
    """Environment for a role's actors: thread counts, CPU DeepSpeed accelerator, quiet tokenizers."""
    env = {
        "OMP_NUM_THREADS": str(spec.threads),
        "MKL_NUM_THREADS": str(spec.threads),
        "TOKENIZERS_PARALLELISM": "false",
        **QUIET_ENV,
        "RLHF_RAY_TORCH_THREADS": str(spec.threads),
    }
    if spec.gpus == 0:
        env["DS_ACCELERATOR"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    for key in ("RLHF_RAY_FAULTS", "RLHF_RAY_FAULTS_DIR", "RLHF_RAY_FAULTS_SLOW_S", "PYTHONPATH"):
        if key in os.environ:
            env[key] = os.environ[key]
    return env


INHERITED_ENV = "RLHF_RAY_INHERITED_ENV"  # the worker environment a local Ray was started with (JSON)


def export_worker_env(spec: RoleSpec) -> None:
    """Before starting a local Ray: put `spec`'s actor environment in this process's environment,
    which the raylet and every worker inherit. Actors whose environment is exactly that then need
    no per-actor runtime_env, so Ray can hand them its prestarted workers (~0.5 s each at start-up)."""
    env = actor_env(spec)
    os.environ.update(env)
    os.environ[INHERITED_ENV] = json.dumps(env, sort_keys=True)


def _runtime_env(spec: RoleSpec) -> dict[str, Any]:
    env = actor_env(spec)
    inherited = json.loads(os.environ.get(INHERITED_ENV, "null"))
    return {} if env == inherited else {"runtime_env": {"env_vars": env}}


def rendezvous(pools: list[WorkerPool], timeout_s: float | None = None) -> None:
    """Each pool's rank 0 reports its address and a free port; every rank then joins its pool's
    torch.distributed group. All joins are submitted before any is awaited: a rank blocks until its
    whole pool has joined (STACK-NOTES: waiting rank by rank deadlocks). `timeout_s`: the start-up
    deadline (placement.timeout_s), which engine construction must meet."""
    addrs = [g.get([g.workers[0].node_address.remote()], "rendezvous", "init", timeout_s)[0] for g in pools]
    pending = [(g, g.call(lambda w, a=addr: w.init_distributed.remote(*a))) for g, addr in zip(pools, addrs)]
    for pool, refs in pending:
        pool.get(refs, "rendezvous", "init", timeout_s)


class LocalPool(Generic[W]):
    """One worker run inside the driver's process, with a `WorkerPool`'s calls: for light roles (a
    rule-function reward) that would otherwise cost a process, its torch import and ~330 MiB.

    `w.method.remote(*args)` starts the call on a background thread (ObjectRef arguments are
    fetched first, as Ray does for actor calls) and `get` waits for it with the same deadline and
    the same one-line `PhaseError` as a remote role. A call that hangs fails the phase at its
    deadline; its thread is abandoned (a daemon), and later calls queue behind it, as on an actor."""

    def __init__(self, spec: RoleSpec, worker_cls: type[W], make_args: Callable[[int], tuple], timeout_s: float):
        self.spec, self.timeout_s = spec, timeout_s
        self._pool = _SerialThread(f"rlhf_ray-{spec.role}")
        self.instance = worker_cls(*make_args(0))
        self.workers = [_Direct(self.instance, self._pool)]

    role = WorkerPool.role
    __len__ = WorkerPool.__len__
    call = WorkerPool.call
    call_each = WorkerPool.call_each

    def get(self, refs: list, phase: str, step: int | str, timeout_s: float | None = None) -> list[Any]:
        from concurrent.futures import TimeoutError as FutureTimeout

        deadline, out = timeout_s or self.timeout_s, []
        for future in refs:
            try:
                out.append(future.result(timeout=deadline))
            except FutureTimeout:
                raise PhaseError(phase, self.role, step, f"no answer within {deadline:g}s") from None
            except Exception as err:  # noqa: BLE001 - the remote path reports any failure the same way
                raise PhaseError(phase, self.role, step, f"{type(err).__name__}: {_first_line(err)}") from err
        return out

    def shutdown(self) -> None:
        self._pool.stop()


class _SerialThread:
    """Runs submitted calls one after another on a daemon thread (a hung call never blocks exit)."""

    def __init__(self, name: str):
        import queue
        import threading

        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def submit(self, fn: Callable, *args, **kwargs):
        from concurrent.futures import Future

        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            future, fn, args, kwargs = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as err:  # noqa: BLE001 - handed to the caller's get
                    future.set_exception(err)


class _Direct:
    """`worker.method.remote(...)` → a Future of `worker.method(...)` on the pool's thread."""

    def __init__(self, instance: Any, pool: _SerialThread):
        self._instance, self._pool = instance, pool

    def __getattr__(self, name: str) -> SimpleNamespace:
        method = getattr(self._instance, name)

        def remote(*args, **kwargs):
            args = [ray.get(a, timeout=60) if isinstance(a, ray.ObjectRef) else a for a in args]
            return self._pool.submit(method, *args, **kwargs)

        return SimpleNamespace(remote=remote)
