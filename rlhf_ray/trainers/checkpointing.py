"""Checkpoints and resume for every stage, on top of the atomic store (`rlhf_ray.checkpoint`).

A save at step k: every rank of every trained role writes its DeepSpeed state (model, optimizer,
scheduler) and RNG into `<tmp>/<role>/`, the driver writes its own state (step, data position, KL
controller, reward normaliser, …) as JSON and tensors, then the store commits: manifest, rename,
`latest` pointer, retention. Resume loads the same pieces back after checking that the run is
compatible (world sizes, models, data, stage), and refuses when it is not, naming the field.

Storage faults (a full or read-only checkpoint.dir, a quota, EIO): a save that the storage refuses,
in the driver or in any rank, deletes its tmp dir where it can and stops the run with one line,
`FAILED phase=checkpoint role=<who wrote> step=<k> cause=StorageError: cannot write checkpoint
<path>: <errno>: <fix>; <root>/latest names <checkpoint>`; not restartable (a restart would hit the
same storage). The previous checkpoint stays complete and named by `latest`.

Graceful stop: `install_stop_handler` makes SIGTERM (what `ray job stop` sends) set a flag; the
loops check it after each step, save a complete checkpoint and raise `StopRequested`.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from rlhf_ray import __version__
from rlhf_ray.checkpoint import (
    CheckpointStore, StorageError, capture_rng, check_compatible, load_json, load_rng, load_tensors, read_manifest,
    restore_rng, save_json, save_rng, save_tensors)
from rlhf_ray.config import OFFLINE_ROLE, RunConfig, dump_config
from rlhf_ray.placement import PhaseError, WorkerPool

_stop = threading.Event()


class StopRequested(RuntimeError):
    """SIGTERM arrived; a checkpoint was written (when one could be) and the run stops."""

    def __init__(self, step: int, saved: Path | None):
        self.step, self.saved = step, saved
        where = f", checkpoint {saved}" if saved else ""
        super().__init__(f"stopped by SIGTERM after step {step}{where}")


def install_stop_handler() -> None:
    """SIGTERM → finish the current step, checkpoint, exit (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: _stop.set())


def stop_requested() -> bool:
    return _stop.is_set()


def compat_fields(cfg: RunConfig) -> dict[str, Any]:
    """What must match between a checkpoint and the run resuming it."""
    p = cfg.placement
    fields = {"stage": cfg.stage, "model.policy": cfg.model.policy, "data.train": cfg.data.train,
              "deepspeed.zero_stage": cfg.deepspeed.zero_stage, "trainer.mini_batch_size": cfg.trainer.mini_batch_size}
    if cfg.stage == "ppo":
        fields |= {"placement.policy.num_workers": p.policy.num_workers,
                   "rollout.samples_per_prompt": cfg.rollout.samples_per_prompt,
                   "trainer.prompts_per_step": cfg.trainer.prompts_per_step, "algo.advantage": cfg.algo.advantage}
        if cfg.uses_critic:
            fields["placement.critic.num_workers"] = p.critic.num_workers
    else:
        role = OFFLINE_ROLE[cfg.stage]
        fields[f"placement.{role}.num_workers"] = getattr(p, role).num_workers
    return fields


class RunCheckpoints:
    """Saves and restores a run: trained pools (DeepSpeed state) plus the driver's state."""

    def __init__(self, cfg: RunConfig, pools: dict[str, WorkerPool]):
        self.cfg, self.pools = cfg, pools
        self.root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else cfg.run_dir / "checkpoints"
        try:
            self.store = CheckpointStore(self.root, cfg.checkpoint.keep_last)
        except StorageError as err:
            raise PhaseError("checkpoint", "driver", "init", f"StorageError: {err}", restartable=False) from err

    def due(self, step: int) -> bool:
        every = self.cfg.checkpoint.every
        return bool(every) and step % every == 0

    def save(self, step: int, driver: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> Path:
        """Every pool's ranks and the driver write into a tmp dir, then the store commits it. On a
        failure the tmp dir is deleted where the storage allows; a storage fault ends the run
        (`_storage_failure`), and so does any other error of the driver's own writes, as the phase's
        one line (`_driver_failure`); a rank's failure keeps its own (restartable) PhaseError."""
        tmp = None
        try:
            tmp = self.store.begin(step)
            self._write(tmp, step, driver, tensors)
            metadata = {"compat": compat_fields(self.cfg), "code_version": __version__, "config": dump_config(self.cfg)}
            return self.store.commit(tmp, step, metadata)
        except BaseException as err:
            if tmp is not None:
                self.store.abort(tmp)
            failure = self._storage_failure(err, step) or self._driver_failure(err, step)
            if failure is None:
                raise
            raise failure from err

    def _write(self, tmp: Path, step: int, driver: dict[str, Any], tensors: dict[str, torch.Tensor] | None) -> None:
        pending = [(g, g.call(lambda w, d=str(tmp / name): w.save_state.remote(d))) for name, g in self.pools.items()]
        for pool, refs in pending:
            pool.get(refs, "checkpoint", step)
        save_json(tmp, "driver", driver)
        save_rng(tmp, "driver_rng", capture_rng())
        if tensors:
            save_tensors(tmp, "driver_tensors", tensors)

    def _storage_failure(self, err: BaseException, step: int) -> PhaseError | None:
        """The one-line, non-restartable failure for a save the storage refused (in the driver or in a
        rank: then `err` is the pool's PhaseError over the rank's StorageError); None for other errors."""
        storage = _storage_error(err)
        if storage is None:
            return None
        return PhaseError("checkpoint", getattr(err, "role", "driver"), step,
                          f"StorageError: {storage}; {self._latest_note()}", restartable=False)

    def _driver_failure(self, err: BaseException, step: int) -> PhaseError | None:
        """`FAILED phase=checkpoint role=driver step=<n> cause=<error>; <latest>` for an error the driver's
        own part of a save raised (a bug, or an injected fault): not restartable, as a restart would
        save the same way. None for a rank's PhaseError, a stop request and interpreter exits."""
        if not isinstance(err, Exception) or isinstance(err, (PhaseError, StopRequested)):
            return None
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return PhaseError("checkpoint", "driver", step, f"{type(err).__name__}: {first}; {self._latest_note()}",
                          restartable=False)

    def _latest_note(self) -> str:
        latest = self.store.latest_name()
        return f"{self.root}/latest names {latest}" if latest else f"no checkpoint under {self.root} yet"

    def restore(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        """(driver state, driver tensors) of the checkpoint `checkpoint.resume` selects, with every pool's
        state loaded; None for a fresh start."""
        path = self.store.resolve(self.cfg.checkpoint.resume)
        if path is None:
            return None
        saved = read_manifest(path)["metadata"]["compat"]
        check_compatible(saved, compat_fields(self.cfg), self.cfg.checkpoint.allow_incompatible_resume,
                         override="checkpoint.allow_incompatible_resume=true")
        pending = [(g, g.call(lambda w, d=str(path / name): w.load_state.remote(d))) for name, g in self.pools.items()]
        for pool, refs in pending:
            pool.get(refs, "resume", "init", self.cfg.placement.timeout_s)
        restore_rng(load_rng(path, "driver_rng"))
        tensors = load_tensors(path, "driver_tensors") if (path / "driver_tensors.safetensors").exists() else {}
        print(f"resumed from {path}", flush=True)
        return load_json(path, "driver"), tensors


def _storage_error(err: BaseException | None) -> StorageError | None:
    """The StorageError behind `err`: itself or, through `raise ... from`, the one a rank raised (a Ray
    task error holds it as `.cause`; its own str is the remote traceback, so `.cause` comes first)."""
    while err is not None:
        if isinstance(getattr(err, "cause", None), StorageError):
            return err.cause
        if isinstance(err, StorageError):
            return err
        err = err.__cause__
    return None


T = TypeVar("T")


def with_restarts(cfg: RunConfig, run_once: Callable[[RunConfig], T], trained_roles: set[str]) -> T:
    """Run a stage; when a training rank fails (it died, hung past its deadline, or its collective
    broke), start the stage again from its latest checkpoint, up to `trainer.max_restarts` times.
    Stateless roles recover inside the run; other failures end it."""
    for attempt in range(cfg.trainer.max_restarts + 1):
        try:
            return run_once(cfg if attempt == 0 else _resuming(cfg))
        except PhaseError as err:
            if err.role not in trained_roles or not err.restartable or attempt == cfg.trainer.max_restarts:
                raise
            print(f"{err}\nrestarting {cfg.stage} from the latest checkpoint "
                  f"({attempt + 1} of trainer.max_restarts={cfg.trainer.max_restarts})", flush=True)
    raise AssertionError("unreachable")


def _resuming(cfg: RunConfig) -> RunConfig:
    return cfg.model_copy(update={"checkpoint": cfg.checkpoint.model_copy(update={"resume": "auto"})})
