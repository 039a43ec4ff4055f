"""Pure pieces of the offline stages (sft, rm, dpo): batch building, ranking → pairs, the visited
set that needs reference log-probs, loss shares that sum to the mini-batch value, the reward
model's input convention, and the sequence outputs the ranks compute. Toy models, no Ray."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlhf_ray.algorithms.losses import LossScale, aggregate
from rlhf_ray.batch import OfflineBatch
from rlhf_ray.config import load_config
from rlhf_ray.data import KTOExample, PreferenceExample, RankedExample, pad_candidates
from rlhf_ray.data.iterator import BatchIterator
from rlhf_ray.models import response_logprobs
from rlhf_ray.rewards.model import ModelReward
from rlhf_ray.toy import build_char_tokenizer, save_toy_models
from rlhf_ray.trainers import dpo, rm, sft
from rlhf_ray.trainers.offline import batch_scale, best_first, ranking_to_pairs, same_list_length, visited_indices
from rlhf_ray.workers import _plain_forward, last_token_scores, sequence_logprobs


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory):
    return save_toy_models(tmp_path_factory.mktemp("toy"), seed=3)


def ids(tok, text: str, eos: bool = True) -> list[int]:
    return tok.encode(text, add_special_tokens=False) + ([tok.eos_token_id] if eos else [])


# ---- batch building ---------------------------------------------------------------------------


def test_pad_candidates_keeps_each_example_together():
    input_ids, attention, response = pad_candidates([[5, 6], [7]], [[[10], [11, 12, 13]], [[14, 15], [16]]], pad_id=0)
    assert input_ids.shape == attention.shape == response.shape == (2, 2, 5)
    assert input_ids.tolist() == [[[5, 6, 10, 0, 0], [5, 6, 11, 12, 13]], [[7, 14, 15, 0, 0], [7, 16, 0, 0, 0]]]
    assert response.tolist() == [[[0, 0, 1, 0, 0], [0, 0, 1, 1, 1]], [[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]]
    assert attention.sum(-1).tolist() == [[3, 5], [3, 2]]


def test_pad_candidates_needs_the_same_k_everywhere():
    with pytest.raises(ValueError, match="same number"):
        pad_candidates([[1], [2]], [[[3], [4]], [[5]]], pad_id=0)


def test_selecting_rows_selects_whole_examples(tok):
    pairs = [PreferenceExample(ids(tok, f"say: {w}\n", False), ids(tok, "aa"), ids(tok, "bcd")) for w in "xyz"]
    batch = dpo.collate(tok.pad_token_id, pairs)
    part = batch.select(slice(1, 3))
    assert part.input_ids.shape[:2] == (2, 2)
    assert torch.equal(part.input_ids, batch.input_ids[1:3])
    assert batch.response_lengths.tolist() == [[3.0, 4.0]] * 3  # EOS included


def test_kto_and_ranked_batches_carry_labels_and_scores(tok):
    prompt = ids(tok, "say: q\n", False)
    kto = dpo.collate(0, [KTOExample(prompt, ids(tok, "ae"), True), KTOExample(prompt, ids(tok, "zz"), False)])
    assert kto.desirable.tolist() == [True, False] and kto.input_ids.shape[:2] == (2, 1)
    ranked = best_first(RankedExample(prompt, [ids(tok, "zz"), ids(tok, "ae"), ids(tok, "ab")], [0.0, 1.0, 0.5]))
    batch = dpo.collate(0, [ranked])
    assert batch.scores.tolist() == [[1.0, 0.5, 0.0]]
    assert batch.input_ids[0, 0, len(prompt)].item() == tok.convert_tokens_to_ids("a")  # "ae" first


# ---- rankings ----------------------------------------------------------------------------------


def test_best_first_sorts_by_score_and_defaults_to_given_order():
    e = RankedExample([1], [[10], [11], [12]], [0.2, 0.9, 0.5])
    assert best_first(e).responses_ids == [[11], [12], [10]] and best_first(e).scores == [0.9, 0.5, 0.2]
    plain = best_first(RankedExample([1], [[10], [11], [12]], None))
    assert plain.responses_ids == [[10], [11], [12]] and plain.scores == [2.0, 1.0, 0.0]


def test_ranking_to_pairs_all_ordered_pairs_without_ties_or_duplicates():
    four = RankedExample([1], [[10], [11], [12], [13]], [0.1, 0.9, 0.5, 0.3])
    pairs = ranking_to_pairs(four)
    assert len(pairs) == 6  # K(K-1)/2
    assert {(p.chosen_ids[0], p.rejected_ids[0]) for p in pairs} == {
        (11, 12), (11, 13), (11, 10), (12, 13), (12, 10), (13, 10)}
    tied = RankedExample([1], [[10], [11], [12]], [0.5, 0.5, 0.1])  # a tie carries no preference
    assert {(p.chosen_ids[0], p.rejected_ids[0]) for p in ranking_to_pairs(tied)} == {(10, 12), (11, 12)}
    same = RankedExample([1], [[10], [10], [12]], None)  # identical texts: no signal
    assert [(p.chosen_ids, p.rejected_ids) for p in ranking_to_pairs(same)] == [([10], [12]), ([10], [12])]


def test_listwise_losses_need_one_list_length():
    lists = [RankedExample([1], [[2], [3]], None), RankedExample([1], [[2], [3], [4]], None)]
    with pytest.raises(ValueError, match=r"ranked.jsonl.*same number of responses.*\[2, 3\]"):
        same_list_length(lists, "ranked.jsonl", "rm.loss=listwise")


def test_visited_indices_are_the_iterators_batches_across_epochs():
    it = BatchIterator(10, 4, seed=7)
    seen = {i for _ in range(5) for i in it.next_indices()}  # 5 batches of 4 > 10: wraps into epoch 2
    assert visited_indices(10, 4, seed=7, steps=5) == sorted(seen)
    assert visited_indices(10, 4, seed=7, steps=1) == sorted(BatchIterator(10, 4, seed=7).next_indices())


# ---- losses as shares of the mini-batch ----------------------------------------------------------


@pytest.mark.parametrize("agg", sorted(sft.SEQUENCE_AGGREGATIONS))
def test_sft_aggregation_from_sequence_sums_equals_token_aggregation(agg):
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    token_lp = -torch.rand(3, 4) * mask  # (B, T) log-probs of response tokens
    batch = OfflineBatch(torch.zeros(3, 1, 5, dtype=torch.long), torch.ones(3, 1, 5, dtype=torch.long),
                         torch.cat([torch.zeros(3, 1, 1), mask.unsqueeze(1)], dim=-1).long())
    scale = LossScale(num_tokens=float(mask.sum()), num_seqs=3.0, max_len=6)
    expected = aggregate(-token_lp, mask, agg, scale)
    whole, _, _ = sft.sft_objective(agg, token_lp.sum(-1, keepdim=True), batch, scale)
    torch.testing.assert_close(whole, expected)
    parts = [sft.sft_objective(agg, token_lp[r].sum(-1, keepdim=True), batch.select(r), scale)[0]
             for r in (slice(0, 1), slice(1, 3))]
    torch.testing.assert_close(sum(parts), expected)  # micro-batch shares sum to the mini-batch loss


def test_dpo_objective_is_log2_at_the_reference_and_shares_sum(tok):
    logprobs = torch.tensor([[-3.0, -5.0], [-2.0, -1.0], [-4.0, -4.5], [-6.0, -2.0]])
    batch = OfflineBatch(*pad_candidates([[1]] * 4, [[[2], [3]]] * 4, 0), ref_logprobs=logprobs.clone())
    cfg = load_config(None, ["stage=dpo"])
    scale = batch_scale(batch, 32)
    loss, shares, _ = dpo.preference_objective(dpo.dpo, cfg.dpo, logprobs, batch, scale)
    assert loss.item() == pytest.approx(math.log(2))
    assert shares["rewards/margin"].item() == 0.0
    moved = logprobs + torch.tensor([[0.5, -0.5]])  # the policy moved towards chosen
    whole, shares, _ = dpo.preference_objective(dpo.dpo, cfg.dpo, moved, batch, scale)
    halves = [dpo.preference_objective(dpo.dpo, cfg.dpo, moved[r], batch.select(r), scale) for r in (slice(0, 1), slice(1, 4))]
    torch.testing.assert_close(halves[0][0] + halves[1][0], whole)
    torch.testing.assert_close(halves[0][1]["rewards/margin"] + halves[1][1]["rewards/margin"], shares["rewards/margin"])
    assert shares["rewards/margin"].item() == pytest.approx(0.1 * 1.0)  # β · (0.5 − (−0.5))


@pytest.mark.parametrize("loss", sorted(dpo.VARIANTS))
def test_every_variant_gives_a_finite_loss_with_a_gradient(tok, loss):
    cfg = load_config(None, ["stage=dpo", f"dpo.loss={loss}"])
    prompt = ids(tok, "say: ab\n", False)
    if loss == "kto":
        batch = dpo.collate(0, [KTOExample(prompt, ids(tok, "ae"), True), KTOExample(prompt, ids(tok, "zzz"), False)])
    elif loss == "rrhf":
        batch = dpo.collate(0, [best_first(RankedExample(prompt, [ids(tok, "zz"), ids(tok, "aei")], [0.0, 1.0]))] * 2)
    else:
        batch = dpo.collate(0, [PreferenceExample(prompt, ids(tok, "aei"), ids(tok, "zz"))] * 2)
    n, k = batch.input_ids.shape[:2]
    batch.ref_logprobs = -torch.full((n, k), 6.0)
    logprobs = (-torch.rand(n, k) * 8).requires_grad_()
    batch.kl_ref = dpo.kto_kl_estimate(logprobs.detach(), batch)
    value, shares, _ = dpo.preference_objective(dpo.VARIANTS[loss], cfg.dpo, logprobs, batch, batch_scale(batch, 32))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logprobs.grad).all() and logprobs.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in shares.values())


def test_kto_kl_estimate_is_the_clamped_mean_logratio():
    batch = OfflineBatch(*pad_candidates([[1]] * 2, [[[2]]] * 2, 0), ref_logprobs=torch.tensor([[-2.0], [-4.0]]))
    assert dpo.kto_kl_estimate(torch.tensor([[-1.0], [-4.0]]), batch) == pytest.approx(0.5)
    assert dpo.kto_kl_estimate(torch.tensor([[-3.0], [-5.0]]), batch) == 0.0


def test_reward_model_objectives_are_shares_with_accuracy_and_margin():
    scores = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    batch = OfflineBatch(*pad_candidates([[]] * 2, [[[1], [2]]] * 2, 0))
    loss, shares, means = rm.pairwise_objective(0.0, scores, batch, batch_scale(batch, 8))
    assert shares["accuracy"].item() == 0.5 and shares["margin"].item() == 0.5
    assert loss.item() == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2)
    lists = torch.tensor([[3.0, 1.0, 2.0]])  # best first: the best wins, one of three pairs out of order
    batch = OfflineBatch(*pad_candidates([[]], [[[1], [2], [3]]], 0))
    _, shares, _ = rm.listwise_objective(lists, batch, batch_scale(batch, 8))
    assert shares["accuracy"].item() == 1.0 and shares["pair_accuracy"].item() == pytest.approx(2 / 3)


# ---- the reward model's input and the ranks' outputs --------------------------------------------


def test_reward_model_ids_are_what_the_ppo_reward_source_scores(tok, toy_dir):
    source = ModelReward(toy_dir.reward)
    chat_prompt = tok.apply_chat_template([{"role": "user", "content": "say: ab\n"}], add_generation_prompt=True,
                                          tokenize=False)
    for prompt_text in ("say: qzk\n", chat_prompt):
        prompt = tok.encode(prompt_text, add_special_tokens=prompt_text == "say: qzk\n")
        for response, stopped in ((ids(tok, "aeb"), True), (ids(tok, "aebcd", eos=False), False)):
            text = prompt_text + tok.decode(response, skip_special_tokens=True)
            assert rm.reward_model_ids(tok, prompt, response) == source._encode(text, stopped)


def test_last_token_scores_equal_the_reward_source(tok, toy_dir):
    source = ModelReward(toy_dir.reward)
    pairs = [PreferenceExample(ids(tok, "say: ab\n", False), ids(tok, "aeiou"), ids(tok, "zz")),
             PreferenceExample(ids(tok, "say: qwerty\n", False), ids(tok, "b"), ids(tok, "aaaaaaaaa", eos=False))]
    batch = rm.collate(tok, pairs)
    with torch.no_grad():
        ours = last_token_scores(source.model, batch)  # (2, 2)
    texts = [("say: ab\n", "aeiou", True), ("say: ab\n", "zz", True), ("say: qwerty\n", "b", True),
             ("say: qwerty\n", "aaaaaaaaa", False)]
    theirs = source.score([t[0] for t in texts], [t[1] for t in texts], [{"stopped": t[2]} for t in texts])
    torch.testing.assert_close(ours.flatten(), torch.tensor(theirs), atol=1e-5, rtol=1e-5)


def test_sequence_logprobs_equal_the_summed_response_logprobs(tok, toy_dir):
    model = AutoModelForCausalLM.from_pretrained(toy_dir.policy).eval()
    prompts = [ids(tok, "say: ab\n", False), ids(tok, "say: qwerty\n", False)]
    responses = [ids(tok, "aeiou"), ids(tok, "zq")]
    batch = sft.collate(0, [sft.SFTExample(p, r) for p, r in zip(prompts, responses)])
    with torch.no_grad():
        ours = sequence_logprobs(_plain_forward(model), batch)[:, 0]
        for b, (p, r) in enumerate(zip(prompts, responses)):
            input_ids = torch.tensor([p + r])
            expected = response_logprobs(model, input_ids, torch.ones_like(input_ids), len(p)).sum()
            assert ours[b].item() == pytest.approx(expected.item(), abs=1e-4)

