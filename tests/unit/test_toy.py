"""The offline toy kit: exact char tokenizer, seeded tiny models, deterministic task data."""

import dataclasses
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_ray.toy import (
    ToyTask,
    build_char_tokenizer,
    build_critic,
    build_policy,
    build_reward_model,
    save_toy_models,
    toy_score,
    vowel_reward,
    write_toy_datasets,
)

PRINTABLE = "\n" + "".join(chr(code) for code in range(32, 127))


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    return save_toy_models(tmp_path_factory.mktemp("toy_models"), seed=0)


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\n", "  a  b\n\nc ", " . , ! ?", "don't"]
    texts += ["".join(rng.choices(PRINTABLE, k=rng.randint(1, 60))) for _ in range(n)]
    return texts


# ---- tokenizer ----


def test_tokenizer_round_trip_is_exact_one_id_per_char(tokenizer):
    for text in random_texts(200):
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text), repr(text)
        assert tokenizer.decode(ids) == text, repr(text)


def test_tokenizer_ids_and_specials(tokenizer):
    assert len(tokenizer) == 103
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 2)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 3)
    roles = ["<|system|>", "<|user|>", "<|assistant|>"]
    assert tokenizer.convert_tokens_to_ids(roles) == [4, 5, 6]
    assert set(roles) <= set(tokenizer.all_special_tokens)
    assert tokenizer("\n ~")["input_ids"] == [7, 8, 102]
    assert tokenizer("abc")["input_ids"] == [ord(c) - 32 + 8 for c in "abc"]  # no BOS/EOS added
    assert tokenizer("é")["input_ids"] == [3]


def test_chat_template(tokenizer):
    messages = [{"role": "user", "content": "say: ab\n"}, {"role": "assistant", "content": "ae"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|user|>say: ab\n</s><|assistant|>ae</s>"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>say: ab\n</s><|assistant|>"
    assert tokenizer(prompt)["input_ids"][0] == 5 and tokenizer(prompt)["input_ids"][-1] == 6


def test_tokenizer_save_load_identical(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in random_texts(50, seed=1):
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert loaded.decode(tokenizer(text)["input_ids"]) == text
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.all_special_tokens == tokenizer.all_special_tokens
    assert loaded.all_special_ids == tokenizer.all_special_ids
    assert loaded.chat_template == tokenizer.chat_template


# ---- models ----


def state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("build", [build_policy, build_reward_model, build_critic])
def test_models_deterministic_from_seed(tokenizer, build):
    rng_before = torch.random.get_rng_state()
    assert state_dicts_equal(build(tokenizer, seed=3), build(tokenizer, seed=3))
    assert not state_dicts_equal(build(tokenizer, seed=3), build(tokenizer, seed=4))
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched


def test_model_sizes(tokenizer):
    policy = build_policy(tokenizer)
    config = policy.config
    assert config.tie_word_embeddings is False
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert sum(p.numel() for p in policy.parameters()) == 95_424
    bench = build_policy(tokenizer, hidden_size=128, intermediate_size=512, num_layers=4)
    assert sum(p.numel() for p in bench.parameters()) == 1_076_096
    assert bench.config.num_hidden_layers == 4


def test_saved_models_reload_with_identical_outputs(tokenizer, saved_models):
    input_ids = torch.tensor([tokenizer("say: abc\naei")["input_ids"]])  # (1, T)
    policy = build_policy(tokenizer, seed=0)
    reloaded = AutoModelForCausalLM.from_pretrained(saved_models.policy)
    with torch.no_grad():
        assert torch.equal(policy(input_ids).logits, reloaded(input_ids).logits)
    reward = build_reward_model(tokenizer, seed=1)
    reloaded_reward = AutoModelForSequenceClassification.from_pretrained(saved_models.reward)
    with torch.no_grad():
        assert torch.equal(reward(input_ids).logits, reloaded_reward(input_ids).logits)
    critic = AutoModelForSequenceClassification.from_pretrained(saved_models.critic)
    assert not state_dicts_equal(critic, reloaded_reward)
    for path in dataclasses.asdict(saved_models).values():
        assert AutoTokenizer.from_pretrained(path).get_vocab() == tokenizer.get_vocab()
        assert (Path(path) / "tokenizer.json").exists()
    assert (Path(saved_models.policy) / "model.safetensors").exists()


def test_reward_pools_last_non_pad_token_left_and_right_padding():
    tokenizer = build_char_tokenizer()  # a fresh one: this test changes padding_side
    reward = build_reward_model(tokenizer, seed=0)
    texts = ["say: ab\naeiou", "say: abcdefg\nxyz", "say: q\na"]
    with torch.no_grad():
        unpadded = [reward(**tokenizer(t, return_tensors="pt")).logits for t in texts]
        single = torch.cat(unpadded)  # (B, 1)
    for side in ("left", "right"):
        tokenizer.padding_side = side
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        mask = batch["attention_mask"]
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T), left padding shifts positions
        with torch.no_grad():
            scores = reward(**batch, position_ids=position_ids).logits
            hidden = reward.model(**batch, position_ids=position_ids).last_hidden_state
            per_token = reward.score(hidden).squeeze(-1)  # (B, T), the critic's view
        last = torch.tensor([row.nonzero().max() for row in mask])
        assert scores.shape == (len(texts), 1)
        torch.testing.assert_close(scores, single, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(scores[:, 0], per_token[torch.arange(len(texts)), last])


# ---- task ----


def test_toy_score_and_vowel_reward():
    assert toy_score("say: x\n", "aeb") == pytest.approx(2 / 3)
    assert toy_score("say: x\n", "") == 0.0
    assert toy_score("", "AEIOU") == 0.0  # only lowercase vowels count
    assert vowel_reward(["p", "p"], ["aaaa", "bbba"], [{}, {}]) == [1.0, 0.25]
    with pytest.raises(ValueError):
        vowel_reward(["p"], ["a", "b"])


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_datasets_byte_identical_for_a_seed(tmp_path):
    a = write_toy_datasets(tmp_path / "a", seed=7, n_train=64, n_eval=16)
    b = write_toy_datasets(tmp_path / "b", seed=7, n_train=64, n_eval=16)
    c = write_toy_datasets(tmp_path / "c", seed=8, n_train=64, n_eval=16)
    for name, path in dataclasses.asdict(a).items():
        assert Path(path).read_bytes() == Path(getattr(b, name)).read_bytes(), name
        assert Path(path).read_bytes() != Path(getattr(c, name)).read_bytes(), name
    assert len(read_jsonl(a.sft_train)) == 64 and len(read_jsonl(a.sft_eval)) == 16


def test_dataset_rows(tmp_path):
    paths = write_toy_datasets(tmp_path, seed=0, n_train=128, n_eval=16)
    prompts = [r["prompt"] for r in read_jsonl(paths.prompts_train)]
    assert all(10 <= len(p) <= 14 and p.startswith("say: ") and p.endswith("\n") for p in prompts)
    assert {len(p) for p in prompts} == set(range(10, 15))
    for row in read_jsonl(paths.preference_train):
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert toy_score(row["prompt"], row["chosen"]) > toy_score(row["prompt"], row["rejected"])
    for row in read_jsonl(paths.ranked_train):
        assert row["scores"] == [toy_score(row["prompt"], r) for r in row["responses"]]
        assert all(a > b for a, b in zip(row["scores"], row["scores"][1:]))
    for row in read_jsonl(paths.kto_train):
        assert row["label"] == (toy_score(row["prompt"], row["response"]) >= 0.5)
    sft = read_jsonl(paths.sft_train)
    assert all(4 <= len(r["response"]) <= 12 and r["response"].isalpha() for r in sft)
    assert 0.5 < sum(toy_score(r["prompt"], r["response"]) for r in sft) / len(sft) < 0.7
    chat = read_jsonl(paths.sft_chat_train)
    assert chat[0] == {"messages": [{"role": "user", "content": sft[0]["prompt"]},
                                    {"role": "assistant", "content": sft[0]["response"]}]}


def test_ranked_lists_k():
    lists = ToyTask(seed=1).ranked_lists(5, k=6)
    assert all(len(x.responses) == len(x.scores) == 6 for x in lists)
    assert ToyTask(seed=1).prompts(3) == ToyTask(seed=1).prompts(3) != ToyTask(seed=2).prompts(3)
