"""Reward-model training (ALGORITHMS.md §6): a scalar head scored at the last real token.

The model is `AutoModelForSequenceClassification` with `num_labels=1`, initialised from
`rm.init` (an SFT export or any causal LM gets a new head; a classifier is used as it is;
default: model.policy). Its input is built exactly as PPO's reward source builds it
(`rlhf_ray.rewards.model.ModelReward`, fed by `workers.RewardWorker`): the prompt text with its
role tokens, plus the response text, tokenised with the tokenizer's own special tokens, plus EOS
when the response ended with one; scored at the last attention-mask position. So the export at
<run_dir>/export/reward loads as-is as a `kind: model` reward source and scores the same way.

Losses (`rm.loss`): Bradley–Terry on preference pairs with an optional margin ("pairwise"; with
`data.margin_from_scores` each pair's own margin m = score_chosen − score_rejected from its row,
as Llama 2's margin from the annotators' rating gap, Touvron et al. 2023 §3.2.2),
InfoNCE over K ranked candidates ("listwise"), or each ranking split into all its ordered pairs
and then Bradley–Terry ("ranked_pairs"). Metrics: loss, accuracy (chosen scores higher; for
lists: the best beats every other), pair_accuracy (lists: share of ordered pairs in order),
margin (mean r_chosen − r_rejected; lists: best − best other), score_mean, score_std.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from rlhf_ray.algorithms.losses import LossScale
from rlhf_ray.algorithms.preference import bradley_terry_loss, listwise_loss
from rlhf_ray.batch import OfflineBatch
from rlhf_ray.config import TOY, ConfigError, RunConfig
from rlhf_ray.data import DataError, PreferenceExample, RankedExample, load_preferences, load_ranked, pad_candidates
from rlhf_ray.models import load_tokenizer
from rlhf_ray.trainers.common import RunInputs, toy_model
from rlhf_ray.trainers.offline import (
    Objective, OfflineStage, best_first, example_share, loader_options, ranking_to_pairs, report, run_offline,
    same_list_length)
from rlhf_ray.workers import ModelPaths


def reward_model_ids(tokenizer, prompt_ids: list[int], response_ids: list[int]) -> list[int]:
    """The reward model's input for one (prompt, response), as PPO's reward source builds it.

    Prompt decoded with its special tokens, a leading BOS dropped (`RewardWorker._prompt_text`);
    response decoded without them; `tokenizer(prompt + response)` with its default specials; EOS
    appended when the response ended with EOS (`ModelReward._encode` with `stopped`).
    """
    eos = tokenizer.eos_token_id
    prompt = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    bos = tokenizer.bos_token
    if bos and prompt.startswith(bos):
        prompt = prompt[len(bos):]
    ids = tokenizer(prompt + tokenizer.decode(response_ids, skip_special_tokens=True))["input_ids"]
    stopped = bool(response_ids) and response_ids[-1] == eos
    if stopped and (not ids or ids[-1] != eos):
        ids = ids + [eos]
    return ids


# ---- losses: scores (n, K), candidates best first ------------------------------------------------


def pairwise_objective(margin: float, scores: Tensor, batch: OfflineBatch, scale: LossScale) -> tuple[Tensor, dict, dict]:
    """Bradley–Terry −log σ(r_c − r_r − m) on (n, 2) scores (chosen, rejected); this micro-batch's share."""
    loss, m = bradley_terry_loss(scores[:, 0], scores[:, 1], margin)
    w = example_share(batch, scale)
    shares = {"accuracy": m["accuracy"], "margin": m["margin"], "score_mean": m["reward_mean"]}
    return loss * w, {k: v * w for k, v in shares.items()}, {"score_std": m["reward_std"]}


def score_margin_objective(scores: Tensor, batch: OfflineBatch, scale: LossScale) -> tuple[Tensor, dict, dict]:
    """Bradley–Terry −log σ(r_c − r_r − m) with m = s_c − s_r, the pair's data scores `batch.scores` (n, 2)."""
    return pairwise_objective(batch.scores[:, 0] - batch.scores[:, 1], scores, batch, scale)


def listwise_objective(scores: Tensor, batch: OfflineBatch, scale: LossScale) -> tuple[Tensor, dict, dict]:
    """InfoNCE −log softmax(r)_best on (n, K) scores, best first; this micro-batch's share."""
    loss, m = listwise_loss(scores)
    s = scores.detach()
    in_order = torch.triu(s.unsqueeze(-1) > s.unsqueeze(-2), diagonal=1)  # (n, K, K): i < j and r_i > r_j
    k = s.shape[1]
    w = example_share(batch, scale)
    shares = {"accuracy": m["accuracy"], "margin": m["margin"], "score_mean": s.mean(),
              "pair_accuracy": in_order.float().sum((-2, -1)).mean() / (k * (k - 1) / 2)}
    return loss * w, {k_: v * w for k_, v in shares.items()}, {"score_std": s.std()}


# ---- data ------------------------------------------------------------------------------------


def load_examples(cfg: RunConfig, tokenizer, source: str, split: str) -> list[PreferenceExample] | list[RankedExample]:
    options = loader_options(cfg) | {"split": split}
    if cfg.rm.loss == "pairwise":
        pairs, load_report = load_preferences(source, tokenizer, **options)
        report(load_report)
        if cfg.data.margin_from_scores and pairs[0].scores is None:  # score columns: in every row or none
            keys = options["keys"]
            raise DataError(source, "missing_key", f"data.margin_from_scores=true needs the columns "
                            f"{keys.score_chosen!r} and {keys.score_rejected!r}; set data.margin_from_scores=false")
        return pairs
    lists, load_report = load_ranked(source, tokenizer, **options)
    report(load_report)
    if cfg.rm.loss == "ranked_pairs":
        return [pair for ranking in lists for pair in ranking_to_pairs(ranking)]
    return same_list_length([best_first(e) for e in lists], source, "rm.loss=listwise")


def collate(tokenizer, examples: list[PreferenceExample] | list[RankedExample]) -> OfflineBatch:
    """Whole sequences (the model scores prompt ⊕ response ⊕ EOS): response_mask = attention_mask;
    pairs that carry data scores put them in `scores` (n, 2)."""
    candidates = [[e.chosen_ids, e.rejected_ids] if isinstance(e, PreferenceExample) else e.responses_ids
                  for e in examples]
    sequences = [[reward_model_ids(tokenizer, e.prompt_ids, c) for c in cands] for e, cands in zip(examples, candidates)]
    ids, attention, response = pad_candidates([[] for _ in examples], sequences, tokenizer.pad_token_id)
    scored = all(isinstance(e, PreferenceExample) and e.scores is not None for e in examples)
    scores = torch.tensor([e.scores for e in examples], dtype=torch.float32) if scored else None
    return OfflineBatch(ids, attention, response, scores=scores)


def objective(cfg: RunConfig) -> Objective:
    """The loss variant, picked once from rm.loss, rm.margin and data.margin_from_scores."""
    if cfg.data.margin_from_scores:
        if cfg.rm.loss != "pairwise" or cfg.rm.margin > 0:
            raise ConfigError(f"data.margin_from_scores=true takes each pair's margin from its scores and needs "
                              f"rm.loss=pairwise and rm.margin=0 (got rm.loss={cfg.rm.loss}, rm.margin={cfg.rm.margin}); "
                              "change those or set data.margin_from_scores=false")
        return score_margin_objective
    return listwise_objective if cfg.rm.loss == "listwise" else functools.partial(pairwise_objective, cfg.rm.margin)


def make_stage(cfg: RunConfig, inputs: RunInputs) -> OfflineStage:
    loss = objective(cfg)
    init = cfg.rm.init or inputs.models.policy
    init = toy_model(cfg, "reward") if init == TOY else init
    tokenizer_path = cfg.model.tokenizer or init
    tokenizer = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code)
    return OfflineStage(
        name="rm", paths=ModelPaths(policy=init, reference=init, critic=init, tokenizer=tokenizer_path),
        export_name="reward",
        load=functools.partial(load_examples, cfg, tokenizer),
        collate=functools.partial(collate, tokenizer),
        loss=loss,
        summary=[("eval accuracy (held out)", "eval/accuracy"), ("eval margin", "eval/margin"),
                 ("eval score mean", "eval/score_mean"), ("eval score std", "eval/score_std")],
    )


def run_rm(cfg: RunConfig) -> dict:
    return run_offline(cfg, make_stage)
