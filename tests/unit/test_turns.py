"""Environment replies as chat turns (rlhf_ray/rollout/turns.py) with the published templates of five
model families: the tokens an episode appends are exactly what the template writes between the
policy's turn and the next one, so the episode reads as the conversation the model was trained on."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.data.conversations import render_conversation
from rlhf_ray.envs.base import StepResult
from rlhf_ray.rollout.base import SamplingParams
from rlhf_ray.rollout.hf import HFRolloutEngine
from rlhf_ray.rollout.multiturn import episode_metrics, run_episodes
from rlhf_ray.rollout.turns import ChatTurns, RawTurns, turn_format
from rlhf_ray.toy import build_char_tokenizer, build_policy
from tests.unit.chat_families import FAMILIES, build_tokenizer

QUESTION = [{"role": "user", "content": "What is 12*7?"}]
TOOL_ROLE = {"llama-3.1": "tool", "llama-3": "tool", "qwen-2.5": "tool", "gemma-2": "user", "mistral": "user"}
GEMMA_EOT = next(f for f in FAMILIES if f.name == "gemma-2")


def _cases():
    """(family, tokenizer) for each family as published, and Gemma with <end_of_turn> as its EOS."""
    yield from ((f.name, f, build_tokenizer(f)) for f in FAMILIES)
    yield "gemma-2-eot", GEMMA_EOT, build_tokenizer(GEMMA_EOT, eos="<end_of_turn>")


CASES = list(_cases())


@pytest.mark.parametrize("name,family,tok", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("closed", [True, False], ids=["turn-ended-by-eos", "turn-cut-at-limit"])
def test_a_reply_continues_the_conversation_exactly_as_the_template_writes_it(name, family, tok, closed):
    turns = ChatTurns(tok)
    role = turns.role("tool")
    assert role == TOOL_ROLE[family.name]  # templates that reject a tool turn get the reply as the user's
    prompt = render_conversation(tok, QUESTION, add_generation_prompt=True)
    policy_turn = "84" + (tok.eos_token if closed else "")  # what the policy sampled, its EOS included
    observation = turns.observation_ids("checked: 84", "tool", closed)
    episode = prompt + policy_turn + tok.decode(observation, skip_special_tokens=False)
    conversation = QUESTION + [{"role": "assistant", "content": "84"}, {"role": role, "content": "checked: 84"}]
    expected = render_conversation(tok, conversation, add_generation_prompt=True)
    if closed and not family.closes.startswith(tok.eos_token):  # Gemma as published: EOS <eos>, turns end <end_of_turn>
        assert episode == expected.replace("84<end_of_turn>", f"84{tok.eos_token}<end_of_turn>", 1)
    else:
        assert episode == expected
    assert observation == tok.encode(tok.decode(observation, skip_special_tokens=False), add_special_tokens=False)
    assert tok.bos_token_id not in observation  # nothing re-opens the conversation


def test_the_toy_template_closes_turns_with_eos_and_writes_other_roles_as_text():
    tok = build_char_tokenizer()
    turns = ChatTurns(tok)
    assert tok.decode(turns.observation_ids("higher\n", "user", closed=True), skip_special_tokens=False) == \
        "<|user|>higher\n</s><|assistant|>"
    assert tok.decode(turns.observation_ids("7", "tool", closed=False), skip_special_tokens=False) == \
        "</s><|tool|>7</s><|assistant|>"


def test_the_format_follows_rollout_env_turns():
    tok = build_char_tokenizer()
    assert isinstance(turn_format(tok, "auto"), ChatTurns) and isinstance(turn_format(tok, "raw"), RawTurns)
    assert RawTurns(tok).observation_ids("hi\n", "tool", closed=True) == tok.encode("hi\n", add_special_tokens=False)
    tok.chat_template = None
    assert isinstance(turn_format(tok, "auto"), RawTurns)
    with pytest.raises(ValueError, match="rollout.env_turns=raw"):
        turn_format(tok, "chat")


def test_a_template_that_drops_unknown_roles_gets_the_reply_as_the_user_s():
    """Zephyr-style templates silently skip roles they do not know: the reply would vanish."""
    tok = build_char_tokenizer()
    tok.chat_template = ("{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}"
                         "{{ '<|' + m['role'] + '|>' + m['content'] + eos_token }}{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")
    assert ChatTurns(tok).role("tool") == "user"


class ToolScript:
    """Two tool turns then an answer; tool results in the "tool" role, counted as ToolEnvironment counts."""

    observation_role = "tool"

    def reset(self, prompt, metadata):
        self.turns = 0
        return ""

    def step(self, action):
        self.turns += 1
        info = {"tool_calls": self.turns, "tool_failures": {"timeout": 1} if self.turns > 1 else {}}
        if self.turns == 3:
            return StepResult("", 1.0, True, info)
        return StepResult(f"result {self.turns}", 0.0, False, info)


def test_an_episode_through_a_real_template_is_the_rendered_conversation_token_by_token():
    """Qwen 2.5's template: prompt, then each policy turn (sampled ids) and each tool reply in its
    <tool_response> turn; decoding the episode gives the template's rendering of that conversation."""
    family = next(f for f in FAMILIES if f.name == "qwen-2.5")
    tok = build_tokenizer(family)
    engine = HFRolloutEngine(build_policy(tok, seed=5).eval(), tok)
    prompt = tok.encode(render_conversation(tok, QUESTION, add_generation_prompt=True), add_special_tokens=False)
    params = SamplingParams(max_new_tokens=4, n=2, suppress_special_tokens=True, logprobs=True)
    samples, infos = run_episodes(engine, tok, [prompt], [{}], ToolScript, params, seed=3, first_index=0,
                                  max_turns=5, max_tokens=200, turns=ChatTurns(tok))
    for row in range(2):
        ids = samples.response_ids[row][(samples.response_mask[row] | samples.observation_mask[row]).bool()].tolist()
        policy = samples.response_mask[row][: len(ids)].bool().tolist()
        turns, current = [], []
        for token, is_policy in zip(ids, policy):  # the policy's turns: runs of policy tokens
            if is_policy:
                current.append(token)
            elif current:
                turns.append(current)
                current = []
        turns.append(current)
        assert len(turns) == 3
        conversation = list(QUESTION)
        for i, turn in enumerate(turns[:2]):
            conversation += [{"role": "assistant", "content": tok.decode(turn)}, {"role": "tool", "content": f"result {i + 1}"}]
        expected = render_conversation(tok, conversation, add_generation_prompt=True) + tok.decode(turns[2])
        assert tok.decode(prompt + ids, skip_special_tokens=False) == expected
    assert samples.tool_counts.tolist() == [[3, 1, 0, 0, 0, 0, 0]] * 2  # calls, then failures by kind (timeout first)
    metrics = episode_metrics(samples)
    assert metrics["rollout/turns_mean"] == 3 and metrics["rollout/tool_calls_mean"] == 3
    assert metrics["rollout/tool_failures/timeout"] == 2 and metrics["rollout/tool_failure_share"] == pytest.approx(2 / 6)
    assert metrics["rollout/tool_use_share"] == 1.0
    assert [len(i) for i in infos] == [3, 3]
    assert torch.all(samples.logprobs[samples.observation_mask.bool()] == 0)
