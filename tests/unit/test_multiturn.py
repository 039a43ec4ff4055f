"""Multi-turn rollouts (rlhf_ray/rollout/multiturn.py) over the real HF engine and a tiny random model,
with a scripted two-turn environment: masks, rewards and behaviour log-probs checked token by token,
and the tokens trained are exactly the ones sampled (token-in/token-out across turns)."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.algorithms.logprobs import logprobs_from_logits
from rlhf_ray.batch import position_ids
from rlhf_ray.envs.base import StepResult
from rlhf_ray.rollout.base import SamplingParams
from rlhf_ray.rollout.hf import HFRolloutEngine
from rlhf_ray.rollout.multiturn import run_episodes
from rlhf_ray.toy import build_char_tokenizer, build_policy

TEMPERATURE = 0.8


class Scripted:
    """Two turns: after the first, reply "obs!" with reward 0.25; after the second, done with reward 1."""

    def __init__(self):
        self.actions: list[str] = []

    def reset(self, prompt: str, metadata: dict) -> str:
        self.prompt, self.metadata = prompt, metadata
        return "go:"

    def step(self, action: str) -> StepResult:
        self.actions.append(action)
        if len(self.actions) == 1:
            return StepResult("obs!", 0.25, False, {"turn": 1})
        return StepResult("", 1.0, True, {"turn": 2})


class Recording(HFRolloutEngine):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []

    def generate(self, prompts, params, seed, first_index=0):
        out = super().generate(prompts, params, seed, first_index)
        self.calls.append((prompts, params, out))
        return out


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_char_tokenizer()
    model = build_policy(tokenizer, seed=3).eval()
    engine = Recording(model, tokenizer)
    prompts = [tokenizer("say: ab\n")["input_ids"], tokenizer("hi\n")["input_ids"]]
    envs: list[Scripted] = []

    def make_env():
        envs.append(Scripted())
        return envs[-1]

    params = SamplingParams(max_new_tokens=5, temperature=TEMPERATURE, n=2, logprobs=True)
    samples, infos = run_episodes(engine, tokenizer, prompts, [{"k": 0}, {"k": 1}], make_env, params, seed=11,
                                  first_index=0, max_turns=4, max_tokens=40)
    return tokenizer, model, engine, prompts, envs, samples, infos


def test_masks_rewards_and_layout_of_a_two_turn_episode(setup):
    tokenizer, _, engine, prompts, envs, samples, infos = setup
    obs = tokenizer.encode("obs!", add_special_tokens=False)
    first = tokenizer.encode("go:", add_special_tokens=False)
    assert len(envs) == 4 and [e.metadata["k"] for e in envs] == [0, 0, 1, 1]  # n = 2 environments per prompt
    assert len(engine.calls) == 2  # one engine call per turn for the whole batch
    turn1, turn2 = engine.calls[0][2], engine.calls[1][2]
    for row in range(4):
        context = prompts[row // 2] + first  # the first observation joins the prompt block
        assert samples.prompt_ids[row][samples.prompt_mask[row].bool()].tolist() == context
        a = turn1.response_ids[row][turn1.response_mask[row].bool()].tolist()
        b = turn2.response_ids[row][turn2.response_mask[row].bool()].tolist()
        tokens = samples.response_ids[row][: len(a) + len(obs) + len(b)].tolist()
        assert tokens == a + obs + b  # the trained tokens are exactly the sampled ones
        assert engine.calls[1][0][row] == context + a + obs  # turn 2 continued from ids, nothing re-tokenised
        policy = samples.response_mask[row].tolist()
        observation = samples.observation_mask[row].tolist()
        width = len(a) + len(obs) + len(b)
        assert policy[:width] == [1] * len(a) + [0] * len(obs) + [1] * len(b) and sum(policy) == len(a) + len(b)
        assert observation[:width] == [0] * len(a) + [1] * len(obs) + [0] * len(b) and sum(observation) == len(obs)
        rewards = samples.env_rewards[row]
        assert rewards[len(a) - 1].item() == 0.25 and rewards[width - 1].item() == 1.0
        assert rewards.sum().item() == pytest.approx(1.25)
        assert envs[row].actions[0] == tokenizer.decode(a, skip_special_tokens=True)
    assert samples.stopped.all()  # the environment ended every episode
    assert [[i["turn"] for i in info] for info in infos] == [[1, 2]] * 4


def test_behaviour_logprobs_are_the_policy_s_on_its_tokens_and_zero_on_observations(setup):
    """A forward over prompt + the whole trajectory (observation tokens attended) gives, at T, the
    engine's log-prob of every policy token (1e-4)."""
    _, model, _, _, _, samples, _ = setup
    mask = samples.attention_mask
    with torch.no_grad():
        logits = model(input_ids=samples.input_ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    p = samples.prompt_ids.shape[1]
    recomputed = logprobs_from_logits(logits[:, p - 1: -1], samples.response_ids, TEMPERATURE)
    policy = samples.response_mask.bool()
    assert torch.allclose(recomputed[policy], samples.logprobs[policy], atol=1e-4)
    assert (samples.logprobs[samples.observation_mask.bool()] == 0).all()
    wrong = logprobs_from_logits(logits[:, p - 1: -1], samples.response_ids, 1.0)  # another temperature
    assert not torch.allclose(wrong[policy], samples.logprobs[policy], atol=1e-2)
    assert all(math.isfinite(x) for x in samples.logprobs[policy].tolist())


def test_budget_and_max_turns_end_episodes():
    """A chatty environment that never says done: max_turns ends it (not the environment: stopped is
    False), and the token budget caps the trajectory."""
    tokenizer = build_char_tokenizer()
    engine = HFRolloutEngine(build_policy(tokenizer, seed=4).eval(), tokenizer)

    class Chatty:
        def reset(self, prompt, metadata):
            return ""

        def step(self, action):
            return StepResult("more?", 0.0, False, {})

    params = SamplingParams(max_new_tokens=4, n=1, suppress_special_tokens=True)
    prompt = [tokenizer("hi\n")["input_ids"]]
    samples, infos = run_episodes(engine, tokenizer, prompt, [{}], Chatty, params, 0, 0, max_turns=3, max_tokens=100)
    assert len(infos[0]) == 3 and not samples.stopped.any()
    assert samples.response_mask.sum().item() == 12  # 3 turns × 4 tokens
    capped, _ = run_episodes(engine, tokenizer, prompt, [{}], Chatty, params, 0, 0, max_turns=10, max_tokens=15)
    assert (capped.response_mask | capped.observation_mask).sum().item() <= 15
