"""The offline driver: SFT, reward-model training and the DPO family on one loop (ARCHITECTURE.md §1–§3).

A stage module (`sft.py`, `rm.py`, `dpo.py`) builds an `OfflineStage`: how its examples load and
pad into an `OfflineBatch`, and its loss on the ranks' sequence outputs — summed response
log-probs ℓ(y) for a policy, last-token scores for a reward model (`workers.OfflineWorker`).
The ranks are one `WorkerPool` of DeepSpeed data-parallel `OfflineWorker`s. One optimizer step:

1. **batch**: the next `trainer.mini_batch_size` examples from the seeded `BatchIterator`, padded
   (with their precomputed reference log-probs where the loss needs them).
2. **update**: the mini-batch cut into equal contiguous shards, one per rank; each rank runs its
   micro-batches and one optimizer step, each micro-batch loss normalised over the WHOLE
   mini-batch (`LossScale`, ALGORITHMS.md §5.3), so ranks and micro-batch size do not change it.

Reference log-probs (dpo, cdpo, ipo, kto, rrhf) are computed once, before the first update, for
every example the run will visit and for the eval set: by the policy ranks themselves when the
reference is the initial policy (`model.reference` null, the default: no second model at all),
else by a frozen copy of `model.reference` that each rank loads for that one pass and drops.

Evaluation: the ranks return the outputs of every held-out example; the driver applies the same
loss function to all of them at once, so eval metrics are exact (not micro-batch averages).
Data is loaded before any actor starts: a bad row stops the run naming file and row at once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from rlhf_ray.algorithms.losses import LossScale
from rlhf_ray.batch import OfflineBatch
from rlhf_ray.config import OFFLINE_ROLE, RunConfig
from rlhf_ray.data import BatchIterator, DataError, LoadReport, PreferenceExample, RankedExample
from rlhf_ray.metrics import MetricsLogger, Timer, mean_over_ranks, summary_table
from rlhf_ray.placement import WorkerPool, rendezvous, reserve, role_spec
from rlhf_ray.trainers.checkpointing import RunCheckpoints, StopRequested, stop_requested, with_restarts
from rlhf_ray.trainers.common import RunInputs, data_keys, prepare_run
from rlhf_ray.workers import ModelPaths, OfflineWorker

REFERENCE_CHUNK = 1024  # examples per reference pass call (bounds the payload of one call)

# loss(outputs (n, K), batch of n examples, mini-batch scale) -> (loss share, shares, means): the
# shares of all micro-batches sum to the mini-batch value; means are averaged (workers._TrainedRole._update).
Objective = Callable[[torch.Tensor, OfflineBatch, LossScale], tuple[torch.Tensor, dict, dict]]


@dataclass(frozen=True)
class OfflineStage:
    """What a stage gives the loop; built once from the config (the loss variant is picked here)."""

    name: str  # "sft" | "rm" | "dpo": metric area (<name>/loss) and summary title
    paths: ModelPaths  # .policy: the model the ranks train; .reference: source of ℓ_ref; .tokenizer: exported with it
    export_name: str  # <run_dir>/export/<export_name>: "policy" | "reward"
    load: Callable[[str, str], list]  # (source, split) → examples; DataError names file and row
    collate: Callable[[list], OfflineBatch]  # examples → padded batch, without reference log-probs
    loss: Objective  # runs on the ranks (training) and on the driver (evaluation)
    summary: list[tuple[str, str]]  # (label, eval metric) rows of the final table
    uses_reference: bool = False  # the loss reads batch.ref_logprobs
    kl_ref: Callable[[torch.Tensor, OfflineBatch], float] | None = None  # KTO's z_0 from the policy's outputs


# ---------------------------------------------------------------------------------------------
# Pure helpers shared by the stages
# ---------------------------------------------------------------------------------------------


def loader_options(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments of the `rlhf_ray.data` loaders from the data section."""
    d = cfg.data
    return {"keys": data_keys(cfg), "max_prompt_len": d.max_prompt_len, "max_response_len": d.max_response_len,
            "overlength": d.overlength, "on_bad_row": d.on_bad_row}


def report(load_report: LoadReport) -> None:
    if load_report.dropped or load_report.truncated:
        print(load_report, flush=True)


def batch_scale(batch: OfflineBatch, max_len: int) -> LossScale:
    """Normalisers of a whole mini-batch: its response tokens, its examples, the length constant."""
    return LossScale(num_tokens=max(float(batch.response_mask.sum()), 1.0), num_seqs=float(batch.batch_size),
                     max_len=max_len)


def example_share(batch: OfflineBatch, scale: LossScale) -> float:
    """Weight turning a mean over this micro-batch's examples into its share of the mini-batch mean."""
    return batch.batch_size / scale.num_seqs


def best_first(example: RankedExample) -> RankedExample:
    """The candidates sorted by score, best first (stable); without scores they already are, and get K-1 … 0."""
    k = len(example.responses_ids)
    if example.scores is None:
        return dataclasses.replace(example, scores=[float(k - 1 - i) for i in range(k)])
    order = sorted(range(k), key=lambda i: -example.scores[i])
    return RankedExample(example.prompt_ids, [example.responses_ids[i] for i in order],
                         [example.scores[i] for i in order])


def ranking_to_pairs(example: RankedExample) -> list[PreferenceExample]:
    """Every (better, worse) pair of a ranking: strictly higher score (or earlier without scores),
    different token ids. K candidates give up to K(K-1)/2 pairs."""
    ranked = best_first(example)
    r, s = ranked.responses_ids, ranked.scores
    return [PreferenceExample(ranked.prompt_ids, r[i], r[j])
            for i in range(len(r)) for j in range(i + 1, len(r)) if s[i] > s[j] and r[i] != r[j]]


def same_list_length(examples: list[RankedExample], source: str, what: str) -> list[RankedExample]:
    """Listwise losses stack K candidates per example: every row must have the same K."""
    counts = sorted({len(e.responses_ids) for e in examples})
    if len(counts) > 1:
        raise DataError(source, "bad_value", f"{what} needs the same number of responses in every row, found "
                        f"{counts}; filter the data (or use rm.loss=ranked_pairs, which takes any number)")
    return examples


def visited_indices(num_examples: int, batch_size: int, seed: int, steps: int) -> list[int]:
    """Every example index the run's iterator yields in `steps` batches (what needs ℓ_ref), sorted."""
    iterator = train_iterator(num_examples, batch_size, seed)
    return sorted({i for _ in range(steps) for i in iterator.next_indices()})


def train_iterator(num_examples: int, batch_size: int, seed: int) -> BatchIterator:
    return BatchIterator(num_examples, batch_size, seed=seed)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


class OfflineTrainer:
    """Owns the data, the iterator, the metrics and the ranks' WorkerPool; never a model."""

    def __init__(self, cfg: RunConfig, stage: OfflineStage, inputs: RunInputs):
        self.cfg, self.stage, t = cfg, stage, cfg.trainer
        self.train_set = stage.load(inputs.train, cfg.data.split)
        self.eval_set = stage.load(inputs.eval, cfg.data.eval_split)[: t.eval_prompts] if inputs.eval else []
        if len(self.train_set) < t.mini_batch_size:
            raise DataError(inputs.train, "too_few_rows", f"{len(self.train_set)} usable examples, fewer than "
                            f"trainer.mini_batch_size={t.mini_batch_size}; lower it or add data")
        self.iterator = train_iterator(len(self.train_set), t.mini_batch_size, t.seed)
        self.eval_batch = stage.collate(self.eval_set) if self.eval_set else None
        self.train_ref: dict[int, np.ndarray] = {}
        self.first_eval: dict[str, float] = {}
        self.pool, self._pg = start_ranks(cfg, stage)
        try:
            self.checkpoints = RunCheckpoints(cfg, {OFFLINE_ROLE[cfg.stage]: self.pool})
            self.start_step = self._resume()
        except BaseException:
            self.close()  # a failed resume must not keep the cluster's resources
            raise
        self.logger = MetricsLogger(cfg.run_dir, cfg.logging, t.total_steps, cfg.model_dump(mode="json"),
                                    resume_step=self.start_step - 1)

    # --- phases -----------------------------------------------------------------------------

    def compute_reference(self) -> None:
        """ℓ_ref of every example the run will visit and of the eval set, once, before any update."""
        if not self.stage.uses_reference:
            return
        t = self.cfg.trainer
        visited = visited_indices(len(self.train_set), t.mini_batch_size, t.seed, t.total_steps)
        for start in range(0, len(visited), REFERENCE_CHUNK):
            chunk = visited[start:start + REFERENCE_CHUNK]
            batch = self.stage.collate([self.train_set[i] for i in chunk])
            self.train_ref.update(zip(chunk, self._fan_out(batch, _reference_call, "reference", "init")))
        if self.eval_batch is not None:
            ref = self._fan_out(self.eval_batch, _reference_call, "reference", "init")
            self.eval_batch.ref_logprobs = torch.from_numpy(ref)
        self.pool.get(self.pool.call(lambda w: w.release_reference.remote()), "reference", "init")

    def train_step(self, step: int) -> dict[str, float]:
        timer, start = Timer(), time.perf_counter()
        with timer.phase("batch"):
            batch = self._batch(self.iterator.next_indices())
            if self.stage.kl_ref is not None:  # KTO: z_0 from the policy as it is before this step
                batch.kl_ref = self.stage.kl_ref(self._outputs(batch, step), batch)
        with timer.phase("update"):
            metrics = self._update(batch, step)
        out = {f"{self.stage.name}/{k}": v for k, v in metrics.items()}
        return out | timer.times | {"time/step": time.perf_counter() - start}

    def evaluate(self, step: int | str) -> dict[str, float]:
        """The stage's loss and metrics on the whole held-out set, from the ranks' outputs."""
        if self.eval_batch is None:
            return {}
        start, batch = time.perf_counter(), self.eval_batch
        outputs = self._outputs(batch, f"eval@{step}")
        if self.stage.kl_ref is not None:
            batch = dataclasses.replace(batch, kl_ref=self.stage.kl_ref(outputs, batch))
        loss, shares, means = self.stage.loss(outputs, batch, batch_scale(batch, self.cfg.data.max_response_len))
        metrics = {"loss": loss} | shares | means
        return {f"eval/{k}": float(v) for k, v in metrics.items()} | {"time/eval": time.perf_counter() - start}

    def export(self) -> str:
        path = str(self.cfg.run_dir / "export" / self.stage.export_name)
        self.pool.get(self.pool.call(lambda w: w.export.remote(path)), "export", "final")
        return path

    def fit(self) -> dict[str, Any]:
        t = self.cfg.trainer
        if self.start_step == 1:
            self.compute_reference()
            self.first_eval = self.evaluate(0)
        final = self.first_eval
        for step in range(self.start_step, t.total_steps + 1):
            metrics = self.train_step(step)
            if step == t.total_steps or (t.eval_every and step % t.eval_every == 0):
                final = self.evaluate(step)
                metrics |= final
            self.logger.log(step, metrics)
            if self.checkpoints.due(step) or stop_requested():
                saved = self.checkpoints.save(step, self.state_dict(step), self._reference_tensors())
                if stop_requested():
                    raise StopRequested(step, saved)
        if self.start_step > t.total_steps:  # resumed from the final checkpoint: evaluate once more
            final = self.evaluate(t.total_steps)
        exported = self.export() if self.cfg.checkpoint.export_hf else None
        return self._summarise(self.first_eval, final, exported)

    def state_dict(self, step: int) -> dict[str, Any]:
        return {"step": step, "iterator": self.iterator.state_dict(), "first_eval": self.first_eval}

    def _reference_tensors(self) -> dict[str, torch.Tensor]:
        """ℓ_ref computed before training (the policy has moved since, so a resume cannot recompute it)."""
        if not self.train_ref:
            return {}
        keys = sorted(self.train_ref)
        out = {"train_ref_index": torch.tensor(keys), "train_ref": torch.from_numpy(np.stack([self.train_ref[k] for k in keys]))}
        if self.eval_batch is not None and self.eval_batch.ref_logprobs is not None:
            out["eval_ref"] = self.eval_batch.ref_logprobs
        return out

    def _resume(self) -> int:
        restored = self.checkpoints.restore()
        if restored is None:
            return 1
        state, tensors = restored
        self.iterator.load_state_dict(state["iterator"])
        self.first_eval = state["first_eval"]
        if "train_ref" in tensors:
            self.train_ref = dict(zip(tensors["train_ref_index"].tolist(), tensors["train_ref"].numpy()))
        if "eval_ref" in tensors and self.eval_batch is not None:
            self.eval_batch.ref_logprobs = tensors["eval_ref"]
        if self.stage.uses_reference:
            self.pool.get(self.pool.call(lambda w: w.release_reference.remote()), "reference", "init")
        return state["step"] + 1

    # --- details ----------------------------------------------------------------------------

    def _batch(self, indices: list[int]) -> OfflineBatch:
        batch = self.stage.collate([self.train_set[i] for i in indices])
        if self.stage.uses_reference:
            batch.ref_logprobs = torch.from_numpy(np.stack([self.train_ref[i] for i in indices]))
        return batch

    def _update(self, batch: OfflineBatch, step: int) -> dict[str, float]:
        """Rank r trains on rows [r·n/R, (r+1)·n/R); the scale is the whole mini-batch's."""
        per = batch.batch_size // len(self.pool)
        shards = [batch.select(slice(r * per, (r + 1) * per)).to_numpy() for r in range(len(self.pool))]
        scale = batch_scale(batch, self.cfg.data.max_response_len)
        refs = self.pool.call_each(lambda w, shard: w.train.remote(shard, scale), shards)
        return mean_over_ranks(self.pool.get(refs, "update", step))

    def _outputs(self, batch: OfflineBatch, step: int | str) -> torch.Tensor:
        return torch.from_numpy(self._fan_out(batch, _outputs_call, "outputs", step))

    def _fan_out(self, batch: OfflineBatch, call, phase: str, step: int | str) -> np.ndarray:
        """A forward-only call over equal shards (the last example repeated to fill them: ZeRO-3
        forwards are collective, every rank must run as many), results in example order. (N, K)"""
        n, ranks = batch.batch_size, len(self.pool)
        per = -(-n // ranks)
        rows = torch.from_numpy(np.minimum(np.arange(per * ranks), n - 1))
        shards = [batch.select(rows[r * per:(r + 1) * per]).to_numpy() for r in range(ranks)]
        return np.concatenate(self.pool.get(self.pool.call_each(call, shards), phase, step))[:n]

    def _summarise(self, first: dict, final: dict, exported: str | None) -> dict[str, Any]:
        history, key = self.logger.history, f"{self.stage.name}/loss"
        rows: list[tuple[str, Any]] = [("train loss, first step", history[0].get(key)),
                                       ("train loss, last step", history[-1].get(key))]
        for label, metric in self.stage.summary:
            rows += [(f"{label}, before", first.get(metric)), (f"{label}, after", final.get(metric))]
        rows += [("median step time (s)", float(np.median([h["time/step"] for h in history]))),
                 ("run directory", str(self.cfg.run_dir)), (f"exported {self.stage.export_name}", exported)]
        self.logger.close()  # ends the progress bar before the table
        title = f"== {self.stage.name.upper()} summary =="
        print(summary_table([(k, v) for k, v in rows if v is not None], title=title), flush=True)
        return {"eval_before": first, "eval_after": final, "export": exported,
                "first_loss": history[0].get(key), "last_loss": history[-1].get(key)}

    def close(self) -> None:
        for worker in self.pool.workers:
            ray.kill(worker)
        ray.util.remove_placement_group(self._pg)


def _outputs_call(worker, shard):
    return worker.outputs.remote(shard)


def _reference_call(worker, shard):
    return worker.reference_logprobs.remote(shard)



def start_ranks(cfg: RunConfig, stage: OfflineStage) -> tuple[WorkerPool[OfflineWorker], Any]:
    """`placement.<role>.num_workers` OfflineWorkers in one placement group, joined into one DeepSpeed group."""
    role = OFFLINE_ROLE[cfg.stage]
    res = getattr(cfg.placement, role)
    spec = role_spec(role, res, torch_threads=cfg.placement.torch_threads)
    pg = reserve([spec], cfg.placement.timeout_s)
    pool = WorkerPool(spec, OfflineWorker, pg, 1.0, lambda r: (cfg, stage.paths, r, spec.num_workers, stage.loss),
                        cfg.trainer.timeout_s)
    try:
        pool.get(pool.call(lambda w: w.ping.remote()), "start", "init", cfg.placement.timeout_s)
        rendezvous([pool], cfg.placement.timeout_s)
    except BaseException:
        for worker in pool.workers:
            ray.kill(worker)
        ray.util.remove_placement_group(pg)
        raise
    return pool, pg


def run_offline(cfg: RunConfig, make_stage: Callable[[RunConfig, RunInputs], OfflineStage]) -> dict[str, Any]:
    """Resolve inputs, load the data (before any actor starts), train, evaluate, export; always release the ranks."""
    inputs = prepare_run(cfg)

    def once(run_cfg: RunConfig) -> dict[str, Any]:
        trainer = OfflineTrainer(run_cfg, make_stage(run_cfg, inputs), inputs)
        try:
            return trainer.fit()
        finally:
            trainer.close()

    return with_restarts(cfg, once, {OFFLINE_ROLE[cfg.stage]})
