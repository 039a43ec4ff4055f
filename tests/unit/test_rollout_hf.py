"""HF rollout engine: sample layout, first-EOS cutting, seeding, weight loading, and agreement of
the recomputed log-probs / values (rlhf_ray.models) with what generation saw."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from rlhf_ray.batch import Samples
from rlhf_ray.models import response_logprobs, response_values
from rlhf_ray.rollout.base import SamplingParams, cut_at_first_eos, probe_tokens
from rlhf_ray.rollout.hf import HFRolloutEngine
from rlhf_ray.toy import build_char_tokenizer, build_critic, build_policy

PROMPTS = ["say: abc\n", "say: hello world\n", "hi\n"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def engine_over(tokenizer, seed=0, special_bias=0.0, **kwargs) -> HFRolloutEngine:
    """A toy policy; `special_bias` is added to the EOS and pad logits (on every forward) so
    responses stop early and the pad id is sampled as an ordinary token."""
    model = build_policy(tokenizer, seed=seed)
    if special_bias:
        bias = torch.zeros(len(tokenizer))
        bias[[tokenizer.eos_token_id, tokenizer.pad_token_id]] = special_bias
        model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    return HFRolloutEngine(model, tokenizer, **kwargs)


def spy_on_generate(model) -> list:
    """Make `model.generate` also return its raw per-step logits; they are appended to the list returned."""
    captured, generate = [], model.generate

    def spy(**kwargs):
        out = generate(**kwargs, return_dict_in_generate=True, output_logits=True)
        captured.append((out.sequences, torch.stack(out.logits, dim=1)))  # (B, P+L), (B, L, V)
        return out.sequences

    model.generate = spy
    return captured


def assert_layout(s: Samples, prompts: list[list[int]], n: int, pad_id: int):
    B, P = len(prompts) * n, max(len(p) for p in prompts)
    assert s.prompt_ids.shape == s.prompt_mask.shape == (B, P)
    assert s.response_ids.shape == s.response_mask.shape and s.response_ids.shape[0] == B
    assert s.stopped.shape == (B,) and s.stopped.dtype == torch.bool
    for row in range(B):
        prompt = prompts[row // n]  # n samples per prompt, contiguous
        assert s.prompt_ids[row, P - len(prompt):].tolist() == prompt
        assert s.prompt_ids[row, : P - len(prompt)].eq(pad_id).all()
        assert s.prompt_mask[row].tolist() == [0] * (P - len(prompt)) + [1] * len(prompt)
        length = int(s.response_mask[row].sum())
        assert s.response_mask[row].tolist() == [1] * length + [0] * (s.response_ids.shape[1] - length)
        assert s.response_ids[row, length:].eq(pad_id).all()
    assert s.response_mask.sum(-1).max() == s.response_ids.shape[1]  # right-padded to the longest


def test_layout_and_contiguous_samples(tokenizer, prompt_ids):
    engine = engine_over(tokenizer)
    s = engine.generate(prompt_ids, SamplingParams(max_new_tokens=12, n=3), seed=0)
    assert_layout(s, prompt_ids, 3, tokenizer.pad_token_id)
    assert s.response_ids.shape[1] <= 12
    assert s.input_ids.shape == (9, s.prompt_ids.shape[1] + s.response_ids.shape[1])


def test_responses_cut_at_first_eos_with_pad_sampled_mid_response(tokenizer, prompt_ids):
    engine = engine_over(tokenizer, special_bias=2.5)
    captured = spy_on_generate(engine.model)
    s = engine.generate(prompt_ids, SamplingParams(max_new_tokens=16, n=4), seed=3)
    assert_layout(s, prompt_ids, 4, tokenizer.pad_token_id)
    raw = captured[0][0][:, s.prompt_ids.shape[1]:]  # (B, L) tokens as generate returned them
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    saw_pad_inside = False
    for row in range(raw.shape[0]):
        tokens = raw[row].tolist()
        length = tokens.index(eos) + 1 if eos in tokens else len(tokens)
        assert int(s.response_mask[row].sum()) == length
        assert s.response_ids[row, :length].tolist() == tokens[:length]
        assert bool(s.stopped[row]) == (eos in tokens)
        saw_pad_inside |= pad in tokens[: length - 1]
    assert s.stopped.any() and saw_pad_inside  # the case this test exists for did occur


def test_cut_at_first_eos_on_crafted_tokens(tokenizer):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    tokens = torch.tensor([
        [10, pad, 11, eos, 12, eos],  # pad sampled as a token; second EOS is padding
        [eos, pad, pad, pad, pad, pad],  # stops at once
        [10, 11, 12, 13, 14, 15],  # hit the length limit
    ])
    ids, mask, stopped = cut_at_first_eos(tokens, eos, pad)
    assert mask.tolist() == [[1, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1] * 6]
    assert ids[0].tolist() == [10, pad, 11, eos, pad, pad]
    assert stopped.tolist() == [True, True, False]
    ids, mask, _ = cut_at_first_eos(tokens[:2], eos, pad)
    assert ids.shape == mask.shape == (2, 4)  # right-padded to the longest response only


def test_seeding(tokenizer, prompt_ids):
    engine = engine_over(tokenizer)
    params = SamplingParams(max_new_tokens=10, n=2)
    rng_before = torch.random.get_rng_state()
    a = engine.generate(prompt_ids, params, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # caller's RNG untouched
    b = engine.generate(prompt_ids, params, seed=7)
    c = engine.generate(prompt_ids, params, seed=8)
    for name, value in a.tensor_fields().items():
        assert torch.equal(value, getattr(b, name)), name
    assert not torch.equal(a.response_ids[:, :5], c.response_ids[:, :5])
    assert not torch.equal(a.response_ids[0, :5], a.response_ids[1, :5])  # samples of one prompt differ


def test_greedy_is_deterministic_and_top_k_1_equals_greedy(tokenizer, prompt_ids):
    engine = engine_over(tokenizer)
    greedy = SamplingParams(max_new_tokens=10, n=2, greedy=True)
    a = engine.generate(prompt_ids, greedy, seed=1)
    b = engine.generate(prompt_ids, greedy, seed=2)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(a.response_ids[0], a.response_ids[1])
    top1 = engine.generate(prompt_ids, SamplingParams(max_new_tokens=10, n=2, top_k=1), seed=3)
    assert torch.equal(top1.response_ids, a.response_ids)


def test_max_batch_chunks_give_the_same_greedy_samples(tokenizer, prompt_ids):
    params = SamplingParams(max_new_tokens=10, n=3, greedy=True)
    whole = engine_over(tokenizer, special_bias=2.0).generate(prompt_ids, params, seed=0)
    chunked = engine_over(tokenizer, special_bias=2.0, max_batch=2).generate(prompt_ids, params, seed=0)
    for name, value in whole.tensor_fields().items():
        assert torch.equal(value, getattr(chunked, name)), name


def test_suppress_special_tokens_gives_full_length_responses(tokenizer, prompt_ids):
    engine = engine_over(tokenizer, special_bias=5.0)  # specials would otherwise dominate
    s = engine.generate(prompt_ids, SamplingParams(max_new_tokens=12, n=2, suppress_special_tokens=True), seed=0)
    assert s.response_ids.shape == (6, 12) and s.response_mask.eq(1).all() and not s.stopped.any()
    assert not torch.isin(s.response_ids, torch.tensor(tokenizer.all_special_ids)).any()


def test_response_logprobs_match_generation_logits(tokenizer, prompt_ids):
    engine = engine_over(tokenizer, special_bias=1.5)  # some rows stop early: right padding is exercised
    captured = spy_on_generate(engine.model)
    temperature = 0.7
    s = engine.generate(prompt_ids, SamplingParams(max_new_tokens=14, n=3, temperature=temperature, top_p=0.95),
                        seed=5)
    assert s.stopped.any() and not s.stopped.all()
    _, raw_logits = captured[0]  # (B, L, V), before temperature / top-p
    T = s.response_ids.shape[1]
    expected = torch.log_softmax(raw_logits[:, :T].float() / temperature, -1)
    expected = expected.gather(-1, s.response_ids.unsqueeze(-1)).squeeze(-1)  # (B, T)
    with torch.no_grad():
        got = response_logprobs(engine.model, s.input_ids, s.attention_mask, s.prompt_ids.shape[1], temperature)
    real = s.response_mask.bool()
    assert got.shape == s.response_ids.shape
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert got[~real].eq(0).all()
    # top_k=0 is off (HF's unset default would be 50): some sampled tokens rank below the top 50.
    ranks = (raw_logits[:, :T] > raw_logits[:, :T].gather(-1, s.response_ids.unsqueeze(-1))).sum(-1)
    assert ranks[real].max() >= 50


def test_response_values_are_the_critic_head_before_each_response_token(tokenizer, prompt_ids):
    engine = engine_over(tokenizer, special_bias=1.5)
    s = engine.generate(prompt_ids, SamplingParams(max_new_tokens=10, n=2), seed=0)
    critic = build_critic(tokenizer, seed=2).eval()
    P = s.prompt_ids.shape[1]
    with torch.no_grad():
        values = response_values(critic, s.input_ids, s.attention_mask, P)  # (B, T)
        assert values.shape == s.response_ids.shape
        for row in range(values.shape[0]):
            tokens = s.input_ids[row][s.attention_mask[row].bool()]  # unpadded sequence
            n_prompt, n_response = int(s.prompt_mask[row].sum()), int(s.response_mask[row].sum())
            per_position = critic.score(critic.model(input_ids=tokens[None]).last_hidden_state)[0, :, 0]
            expected = per_position[n_prompt - 1 : n_prompt - 1 + n_response]
            torch.testing.assert_close(values[row, :n_response], expected, atol=1e-5, rtol=0)
            assert values[row, n_response:].eq(0).all()


def params_of(engine: HFRolloutEngine) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in engine.model.named_parameters()}


def test_load_weights_round_trip(tokenizer):
    source = build_policy(tokenizer, seed=0)
    engine = engine_over(tokenizer, seed=1)
    x = torch.tensor([tokenizer("say: round trip\n")["input_ids"]])
    assert not torch.equal(source(x).logits, engine.model(x).logits)
    engine.load_weights((name, p.detach().numpy()) for name, p in source.named_parameters())
    with torch.no_grad():
        assert torch.equal(source(x).logits, engine.model(x).logits)
    probe = probe_tokens(len(tokenizer))
    assert np.array_equal(engine.probe_logprobs(probe), HFRolloutEngine(source, tokenizer).probe_logprobs(probe))


def test_load_weights_bf16_payload_as_int16(tokenizer):
    source = build_policy(tokenizer, seed=0).to(torch.bfloat16)
    payload = {name: p.detach().view(torch.int16).numpy() for name, p in source.named_parameters()}
    fp32_engine = engine_over(tokenizer, seed=1)
    fp32_engine.load_weights(payload.items())  # viewed back as bf16, then converted to the param's dtype
    bf16_engine = HFRolloutEngine(build_policy(tokenizer, seed=1).to(torch.bfloat16), tokenizer)
    bf16_engine.load_weights(payload.items())
    for name, p in source.named_parameters():
        assert torch.equal(dict(fp32_engine.model.named_parameters())[name], p.float())
        assert torch.equal(dict(bf16_engine.model.named_parameters())[name], p)


def test_load_weights_rejects_bad_names_and_shapes_before_copying(tokenizer):
    engine = engine_over(tokenizer)
    before = params_of(engine)
    name, param = next(iter(engine.model.named_parameters()))
    good = np.zeros(tuple(param.shape), np.float32)
    with pytest.raises(KeyError, match="not.a.param"):
        engine.load_weights([(name, good), ("not.a.param", good)])
    with pytest.raises(ValueError, match=name):
        engine.load_weights([(name, np.zeros((3, 3), np.float32))])
    assert all(torch.equal(before[k], v) for k, v in params_of(engine).items())  # nothing was copied


@pytest.mark.parametrize("suppress", [False, True])
def test_behaviour_logprobs_are_the_raw_logits_at_temperature_and_leave_samples_unchanged(tokenizer, prompt_ids, suppress):
    engine = engine_over(tokenizer, special_bias=1.5, max_batch=4)  # early stops and two chunks
    captured = spy_on_generate(engine.model)
    params = SamplingParams(max_new_tokens=14, n=3, temperature=0.7, top_p=0.95, suppress_special_tokens=suppress)
    plain = engine.generate(prompt_ids, params, seed=5)
    recorded = engine.generate(prompt_ids, replace(params, logprobs=True), seed=5)
    assert plain.logprobs is None
    torch.testing.assert_close(recorded.response_ids, plain.response_ids, rtol=0, atol=0)  # same samples
    torch.testing.assert_close(recorded.response_mask, plain.response_mask, rtol=0, atol=0)
    T, real = recorded.response_ids.shape[1], recorded.response_mask.bool()
    raw = torch.cat([pad_to3(logits, T) for _, logits in captured[len(captured) // 2:]])  # the recorded call's chunks
    expected = torch.log_softmax(raw[:, :T].float() / 0.7, -1).gather(-1, recorded.response_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(recorded.logprobs[real], expected[real], atol=1e-6, rtol=0)
    assert recorded.logprobs[~real].eq(0).all() and (recorded.logprobs[real] < 0).all()
    # and they agree with the trainer's recomputation (the engine-vs-trainer mismatch is numerical only)
    with torch.no_grad():
        trainer = response_logprobs(engine.model, recorded.input_ids, recorded.attention_mask,
                                    recorded.prompt_ids.shape[1], 0.7)
    torch.testing.assert_close(trainer[real], recorded.logprobs[real], atol=1e-5, rtol=0)


def pad_to3(logits: torch.Tensor, width: int) -> torch.Tensor:
    """(B, L, V) right-padded with zeros to (B, max(L, width), V)."""
    extra = width - logits.shape[1]
    return logits if extra <= 0 else torch.cat([logits, logits.new_zeros(logits.shape[0], extra, logits.shape[2])], 1)


def test_greedy_returns_no_behaviour_logprobs(tokenizer, prompt_ids):
    s = engine_over(tokenizer).generate(prompt_ids, SamplingParams(max_new_tokens=4, greedy=True, logprobs=True), seed=0)
    assert s.logprobs is None
