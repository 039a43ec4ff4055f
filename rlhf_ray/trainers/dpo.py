"""Offline preference optimisation, the DPO family (ALGORITHMS.md §7): no rollouts, no reward model.

`dpo.loss` picks one variant, once: dpo (cDPO with `dpo.label_smoothing` > 0), ipo, simpo, orpo on
preference pairs; kto on unpaired rows with a desirable/undesirable label; rrhf on ranked lists
with scores. The ranks' outputs are ℓ_θ(y), each response's summed log-probs; the length-averaged
variants (ipo, simpo, orpo, rrhf) divide by |y|.

Reference log-probs ℓ_ref(y) (dpo, ipo, kto, rrhf) are computed ONCE, before the first update,
for every example the run will visit and for the eval set (trainers/offline.py): by the policy
ranks themselves when the reference is the initial policy (model.reference null, the default),
else by a frozen copy of model.reference loaded on each rank for that one pass. simpo and orpo
need no reference. KTO's z_0 (a batch estimate of KL(π_θ‖π_ref)) is the mini-batch mean of
ℓ_θ(y) − ℓ_ref(y), clamped at 0, from a forward pass of the current policy before each step.

Metrics: loss, rewards/chosen, rewards/rejected (implicit rewards β(ℓ_θ − ℓ_ref), or β·ℓ/|y| for
simpo), rewards/accuracy, rewards/margin, and each variant's own terms (orpo: nll,
log_odds_ratio; kto: kl; rrhf: rank_loss, nll). The policy is exported to <run_dir>/export/policy.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from rlhf_ray.algorithms.losses import LossScale
from rlhf_ray.algorithms.preference import dpo_loss, ipo_loss, kto_loss, orpo_loss, rrhf_loss, simpo_loss
from rlhf_ray.batch import OfflineBatch
from rlhf_ray.config import DPOConfig, RunConfig
from rlhf_ray.data import KTOExample, PreferenceExample, RankedExample, load_kto, load_preferences, load_ranked, pad_candidates
from rlhf_ray.models import load_tokenizer
from rlhf_ray.trainers.common import RunInputs
from rlhf_ray.trainers.offline import (
    OfflineStage, best_first, example_share, loader_options, report, run_offline, same_list_length)

Metrics = dict[str, Tensor]

# ---- one function per variant: (config, ℓ_θ (n, K), batch) -> (mean loss over the n examples, metrics)


def dpo(d: DPOConfig, logprobs: Tensor, batch: OfflineBatch) -> tuple[Tensor, Metrics]:
    ref = batch.ref_logprobs
    return dpo_loss(logprobs[:, 0], logprobs[:, 1], ref[:, 0], ref[:, 1], d.beta, d.label_smoothing)


def ipo(d: DPOConfig, logprobs: Tensor, batch: OfflineBatch) -> tuple[Tensor, Metrics]:
    avg, ref_avg = logprobs / batch.response_lengths, batch.ref_logprobs / batch.response_lengths
    return ipo_loss(avg[:, 0], avg[:, 1], ref_avg[:, 0], ref_avg[:, 1], d.beta)


def simpo(d: DPOConfig, logprobs: Tensor, batch: OfflineBatch) -> tuple[Tensor, Metrics]:
    avg = logprobs / batch.response_lengths
    return simpo_loss(avg[:, 0], avg[:, 1], d.beta, d.simpo_gamma)


def orpo(d: DPOConfig, logprobs: Tensor, batch: OfflineBatch) -> tuple[Tensor, Metrics]:
    avg = logprobs / batch.response_lengths
    return orpo_loss(avg[:, 0], avg[:, 1], -avg[:, 0], d.orpo_lambda)  # L_SFT(y_c): its mean token NLL


def kto(d: DPOConfig, logprobs: Tensor, batch: OfflineBatch) -> tuple[Tensor, Metrics]:
    logratios = logprobs[:, 0] - batch.ref_logprobs[:, 0]
    return kto_loss(logratios, batch.desirable, batch.kl_ref, d.beta, d.kto_desirable_weight, d.kto_undesirable_weight)


def rrhf(d: DPOConfig, logprobs: Tensor, batch: OfflineBatch) -> tuple[Tensor, Metrics]:
    avg = logprobs / batch.response_lengths  # (n, K), candidates best first
    return rrhf_loss(avg, batch.scores, -avg[:, 0])  # L_SFT of the best candidate: its mean token NLL


VARIANTS = {"dpo": dpo, "ipo": ipo, "simpo": simpo, "orpo": orpo, "kto": kto, "rrhf": rrhf}
NEEDS_REFERENCE = {"dpo", "ipo", "kto", "rrhf"}


def preference_objective(variant, d: DPOConfig, logprobs: Tensor, batch: OfflineBatch,
                         scale: LossScale) -> tuple[Tensor, dict, dict]:
    """The variant's loss and metrics as this micro-batch's share of the mini-batch means."""
    loss, metrics = variant(d, logprobs, batch)
    w = example_share(batch, scale)
    return loss * w, {k: v * w for k, v in metrics.items()}, {}


def kto_kl_estimate(logprobs: Tensor, batch: OfflineBatch) -> float:
    """KTO's z_0 = max(0, mean of ℓ_θ(y) − ℓ_ref(y) over the batch), a detached number."""
    return max(0.0, float((logprobs[:, 0] - batch.ref_logprobs[:, 0]).mean()))


# ---- data ------------------------------------------------------------------------------------


def load_examples(cfg: RunConfig, tokenizer, source: str, split: str) -> list:
    options = loader_options(cfg) | {"split": split}
    loader = {"kto": load_kto, "rrhf": load_ranked}.get(cfg.dpo.loss, load_preferences)
    examples, load_report = loader(source, tokenizer, **options)
    report(load_report)
    if cfg.dpo.loss == "rrhf":
        return same_list_length([best_first(e) for e in examples], source, "dpo.loss=rrhf")
    return examples


def collate(pad_id: int, examples: list) -> OfflineBatch:
    prompts = [e.prompt_ids for e in examples]
    first = examples[0]
    if isinstance(first, PreferenceExample):
        return OfflineBatch(*pad_candidates(prompts, [[e.chosen_ids, e.rejected_ids] for e in examples], pad_id))
    if isinstance(first, KTOExample):
        desirable = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
        return OfflineBatch(*pad_candidates(prompts, [[e.response_ids] for e in examples], pad_id), desirable=desirable)
    if isinstance(first, RankedExample):
        scores = torch.tensor([e.scores for e in examples], dtype=torch.float32)
        return OfflineBatch(*pad_candidates(prompts, [e.responses_ids for e in examples], pad_id), scores=scores)
    raise TypeError(f"no DPO-family batch for {type(first).__name__}")


def make_stage(cfg: RunConfig, inputs: RunInputs) -> OfflineStage:
    tokenizer = load_tokenizer(inputs.models.tokenizer, cfg.model.trust_remote_code)
    loss = cfg.dpo.loss
    return OfflineStage(
        name="dpo", paths=inputs.models, export_name="policy",
        load=functools.partial(load_examples, cfg, tokenizer),
        collate=functools.partial(collate, tokenizer.pad_token_id),
        loss=functools.partial(preference_objective, VARIANTS[loss], cfg.dpo),
        summary=[("eval loss", "eval/loss"), ("eval reward accuracy", "eval/rewards/accuracy"),
                 ("eval reward margin", "eval/rewards/margin")],
        uses_reference=loss in NEEDS_REFERENCE,
        kl_ref=kto_kl_estimate if loss == "kto" else None,
    )


def run_dpo(cfg: RunConfig) -> dict:
    return run_offline(cfg, make_stage)
