"""Supervised fine-tuning (ALGORITHMS.md §8): negative log-likelihood of the response tokens only.

Examples are `prompt` + `response` (or `completion`) rows, `messages` conversations (the prompt
rendered with the tokenizer's chat template) or `text` rows; see `rlhf_ray.data.records`. In a
multi-turn conversation every assistant turn is trained (`data.sft_turns=all`, the default: its
tokens carry response_mask 1 inside the prompt, `SFTExample.assistant_mask`) or only the last
(`last`); the other turns are context. Each mini-batch is right-padded to its
longest example — no packing: examples are short here, and padding keeps every row's positions
and attention exactly those of inference. Token losses are aggregated as `algo.loss_agg` says
(§5.3), normalised over the whole mini-batch. The trained policy is exported to
<run_dir>/export/policy.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from rlhf_ray.algorithms.losses import LossScale
from rlhf_ray.batch import OfflineBatch
from rlhf_ray.config import RunConfig
from rlhf_ray.data import SFTExample, load_sft, pad_candidates
from rlhf_ray.models import load_tokenizer
from rlhf_ray.trainers.common import RunInputs
from rlhf_ray.trainers.offline import OfflineStage, loader_options, report, run_offline

# Each aggregation of §5.3 from per-sequence sums: nll (n,) = −ℓ(y), lengths (n,) = |y|.
SEQUENCE_AGGREGATIONS = {
    "token-mean": lambda nll, lengths, scale: nll.sum() / scale.num_tokens,
    "seq-mean-token-mean": lambda nll, lengths, scale: (nll / lengths).sum() / scale.num_seqs,
    "seq-mean-token-sum-norm": lambda nll, lengths, scale: nll.sum() / (scale.max_len * scale.num_seqs),
}


def sft_objective(agg: str, logprobs: Tensor, batch: OfflineBatch, scale: LossScale) -> tuple[Tensor, dict, dict]:
    """This micro-batch's share of the mini-batch SFT loss. `logprobs` (n, 1): ℓ(y) summed over response tokens.

    Metrics: nll, the token-mean NLL (the loss itself under token-mean).
    """
    nll = -logprobs[:, 0]  # (n,)
    loss = SEQUENCE_AGGREGATIONS[agg](nll, batch.response_lengths[:, 0], scale)
    return loss, {"nll": nll.detach().sum() / scale.num_tokens}, {}


def load_examples(cfg: RunConfig, tokenizer, source: str, split: str) -> list[SFTExample]:
    examples, load_report = load_sft(source, tokenizer, split=split, sft_turns=cfg.data.sft_turns, **loader_options(cfg))
    report(load_report)
    return examples


def collate(pad_id: int, examples: list[SFTExample]) -> OfflineBatch:
    """K = 1; response_mask is 1 on the response and on the earlier assistant turns inside the prompt."""
    ids, attention, response = pad_candidates([e.prompt_ids for e in examples], [[e.response_ids] for e in examples], pad_id)
    for b, example in enumerate(examples):
        if example.assistant_mask is not None:
            response[b, 0, :len(example.assistant_mask)] = torch.tensor(example.assistant_mask)
    return OfflineBatch(ids, attention, response)


def make_stage(cfg: RunConfig, inputs: RunInputs) -> OfflineStage:
    tokenizer = load_tokenizer(inputs.models.tokenizer, cfg.model.trust_remote_code)
    return OfflineStage(
        name="sft", paths=inputs.models, export_name="policy",
        load=functools.partial(load_examples, cfg, tokenizer),
        collate=functools.partial(collate, tokenizer.pad_token_id),
        loss=functools.partial(sft_objective, cfg.algo.loss_agg),
        summary=[("eval loss (NLL per token)", "eval/nll")],
    )


def run_sft(cfg: RunConfig) -> dict:
    return run_offline(cfg, make_stage)
