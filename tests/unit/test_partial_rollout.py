"""Partial rollouts (rlhf_ray/rollout/partial.py) over the real HF engine and tiny random models: the
segmented output is a well-formed `Samples`, each token is tagged with (and its behaviour log-prob comes
from) the weights that produced it, runs are reproducible, and continuations are token-in/token-out."""

import math
from dataclasses import dataclass

import pytest
import torch

from rlhf_ray.algorithms.logprobs import logprobs_from_logits
from rlhf_ray.batch import Samples, position_ids
from rlhf_ray.rollout.base import SamplingParams
from rlhf_ray.rollout.hf import HFRolloutEngine
from rlhf_ray.rollout.partial import generate_in_segments
from rlhf_ray.toy import build_char_tokenizer, build_policy

PROMPTS = ["say: abc\n", "say: hello world\n", "hi\n"]
SEGMENT, MAX_NEW = 3, 10
EOS_BIAS = 2.5  # added to the EOS logit: ~10% per token, so some rows stop mid-response and some never do


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def biased_policy(tokenizer, seed: int):
    """A toy policy whose EOS logit gets `EOS_BIAS` on every forward (a hook, not a weight: it survives
    `load_weights`), so responses of both kinds, stopped and full-length, occur."""
    model = build_policy(tokenizer, seed=seed).eval()
    bias = torch.zeros(len(tokenizer))
    bias[tokenizer.eos_token_id] = EOS_BIAS
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    return model


@dataclass
class Call:
    prompts: list[list[int]]
    params: SamplingParams
    seed: int
    first_index: int
    out: Samples


class RecordingEngine(HFRolloutEngine):
    """The real HF engine, also keeping each `generate` call's arguments and output."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[Call] = []

    def generate(self, prompts, params, seed, first_index=0):
        out = super().generate(prompts, params, seed, first_index)
        self.calls.append(Call([list(p) for p in prompts], params, seed, first_index, out))
        return out


def engine_over(tokenizer, seed: int = 0) -> RecordingEngine:
    return RecordingEngine(biased_policy(tokenizer, seed), tokenizer)


class Boundary:
    """`at_boundary`: on its first call loads `weights` into `engine` (when given) and returns `new_version`;
    counts its calls."""

    def __init__(self, engine=None, weights=None, old_version: int = 0, new_version: int = 0):
        self.engine, self.weights, self.version, self.new_version = engine, weights, old_version, new_version
        self.calls = 0

    def __call__(self) -> int:
        if self.calls == 0 and self.weights is not None:
            self.engine.load_weights(self.weights)
            self.version = self.new_version
        self.calls += 1
        return self.version


def segmented(engine, prompts, boundary, n=2, seed=3, temperature=1.0, logprobs=False, version=0) -> Samples:
    params = SamplingParams(max_new_tokens=MAX_NEW, n=n, temperature=temperature, logprobs=logprobs)
    return generate_in_segments(engine, prompts, params, seed=seed, first_index=0, segment_tokens=SEGMENT,
                                at_boundary=boundary, version=version)


def test_segmented_output_is_well_formed(tokenizer, prompt_ids):
    engine, boundary = engine_over(tokenizer), Boundary(old_version=5)
    s = segmented(engine, prompt_ids, boundary, version=5)
    n, eos, pad = 2, tokenizer.eos_token_id, tokenizer.pad_token_id
    B, P, T = len(prompt_ids) * n, max(map(len, prompt_ids)), s.response_ids.shape[1]
    assert s.prompt_ids.shape == s.prompt_mask.shape == (B, P)
    assert s.response_ids.shape == s.response_mask.shape == s.token_versions.shape == (B, T)
    assert s.stopped.shape == s.versions.shape == (B,) and s.stopped.dtype == torch.bool
    assert s.logprobs is None
    lengths = s.response_mask.sum(-1)
    assert T == int(lengths.max()) <= MAX_NEW
    for row in range(B):
        prompt, length = prompt_ids[row // n], int(lengths[row])
        assert s.prompt_ids[row, P - len(prompt):].tolist() == prompt and s.prompt_mask[row].sum() == len(prompt)
        assert s.response_mask[row].tolist() == [1] * length + [0] * (T - length)  # contiguous from 0
        tokens = s.response_ids[row, :length].tolist()
        if s.stopped[row]:
            assert tokens[-1] == eos and eos not in tokens[:-1]
        else:
            assert length == MAX_NEW and eos not in tokens
        assert s.response_ids[row, length:].eq(pad).all() and s.token_versions[row, length:].eq(0).all()
    assert s.token_versions[s.response_mask.bool()].eq(5).all() and s.versions.eq(5).all()
    assert s.stopped.any() and not s.stopped.all()  # both kinds of row occurred
    assert (lengths < MAX_NEW).logical_and(lengths > SEGMENT).any()  # a row stopped in a later segment
    segments = max(math.ceil(int(length) / SEGMENT) for length in lengths)
    assert segments == math.ceil(MAX_NEW / SEGMENT) == len(engine.calls)
    assert boundary.calls == segments - 1


def response_logprobs_under(model, s: Samples, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each response token given the original prompt and all earlier response
    tokens, one plain forward pass over the left-padded batch, (B, T)."""
    P = s.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=s.input_ids, attention_mask=s.attention_mask,
                       position_ids=position_ids(s.attention_mask)).logits  # (B, P + T, V)
    return logprobs_from_logits(logits[:, P - 1 : -1], s.response_ids, temperature)


def test_tokens_are_tagged_and_scored_by_the_weights_that_produced_them(tokenizer, prompt_ids):
    temperature = 0.8
    policy_a, policy_b = biased_policy(tokenizer, seed=0), biased_policy(tokenizer, seed=1)
    engine = engine_over(tokenizer, seed=0)  # holds A's weights
    b_weights = [(name, p.detach().clone()) for name, p in policy_b.named_parameters()]
    boundary = Boundary(engine, b_weights, old_version=0, new_version=1)
    s = segmented(engine, prompt_ids, boundary, temperature=temperature, logprobs=True)
    real = s.response_mask.bool()
    # segment 0 (the first SEGMENT tokens) came from A, version 0; everything after from B, version 1
    expected_versions = (torch.arange(s.response_ids.shape[1]) >= SEGMENT).long().expand_as(real)
    assert torch.equal(s.token_versions[real], expected_versions[real])
    assert s.token_versions[real].eq(1).any() and s.versions.eq(0).all()
    under_a = response_logprobs_under(policy_a, s, temperature)  # (B, T)
    under_b = response_logprobs_under(policy_b, s, temperature)
    expected = torch.where(s.token_versions == 0, under_a, under_b)
    torch.testing.assert_close(s.logprobs[real], expected[real], atol=1e-4, rtol=0)
    assert s.logprobs[~real].eq(0).all()
    from_b = real & (s.token_versions == 1)  # not vacuous: A's log-probs would not match B's tokens
    assert (s.logprobs[from_b] - under_a[from_b]).abs().max() > 1e-2


def test_same_inputs_and_boundaries_give_the_same_samples(tokenizer, prompt_ids):
    runs = [segmented(engine_over(tokenizer), prompt_ids, Boundary(), seed=11, logprobs=True) for _ in range(2)]
    for name, value in runs[0].tensor_fields().items():
        assert torch.equal(value, getattr(runs[1], name)), name
    other = segmented(engine_over(tokenizer), prompt_ids, Boundary(), seed=12)
    assert not torch.equal(other.response_ids, runs[0].response_ids)


def test_continuations_are_the_prompt_plus_tokens_so_far(tokenizer, prompt_ids):
    n = 2
    engine = engine_over(tokenizer)
    s = segmented(engine, prompt_ids, Boundary(), n=n)
    first, *later = engine.calls
    assert first.prompts == prompt_ids and first.params.n == n and first.params.max_new_tokens == SEGMENT
    lengths = s.response_mask.sum(-1).tolist()
    for j, call in enumerate(later, start=1):
        done = j * SEGMENT  # tokens every continued row has so far
        continued = [row for row in range(len(lengths)) if lengths[row] > done]  # in row order
        assert call.params.n == 1 and call.params.max_new_tokens == min(SEGMENT, MAX_NEW - done)
        assert call.prompts == [prompt_ids[row // n] + s.response_ids[row, :done].tolist() for row in continued]
        for k, row in enumerate(continued):  # the row's next tokens are exactly this segment's output
            length = int(call.out.response_mask[k].sum())
            assert call.out.response_ids[k, :length].tolist() == s.response_ids[row, done : done + length].tolist()
    assert len(later) >= 2 and any(len(c.prompts) < len(prompt_ids) * n for c in later)  # rows dropped out
    assert len({c.seed for c in engine.calls}) == len(engine.calls)  # each segment its own seed
