"""The `data` section reaches the stages' data loading: column names, hub splits, over-long prompts and
SFT turns, through the loaders the stages build from the config (`make_stage(cfg, inputs).load`, the
trainers' constructors) rather than through the loader functions' own keywords."""

from __future__ import annotations

import json

import datasets
import pytest

from rlhf_ray.config import load_config
from rlhf_ray.data import DataError, sources
from rlhf_ray.toy import build_char_tokenizer
from rlhf_ray.trainers import dpo, offline, ppo, sft
from rlhf_ray.trainers.common import RunInputs
from rlhf_ray.workers import ModelPaths


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tokenizer) -> RunInputs:
    path = str(tmp_path_factory.mktemp("tok"))
    tokenizer.save_pretrained(path)
    return RunInputs(ModelPaths(path, path, path, path), [], "unused", None)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prompt_and_response_keys_name_the_sft_columns(tmp_path, inputs, tokenizer):
    source = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "four"}])
    cfg = load_config(None, ["stage=sft", "data.prompt_key=question", "data.response_key=answer"])
    [example] = sft.make_stage(cfg, inputs).load(source, "train")
    assert tokenizer.decode(example.prompt_ids) == "2+2?"
    assert tokenizer.decode(example.response_ids, skip_special_tokens=True) == "four"
    with pytest.raises(DataError):  # the default keys (prompt, response) are not in these rows
        sft.make_stage(load_config(None, ["stage=sft"]), inputs).load(source, "train")


def test_chosen_and_rejected_keys_name_the_preference_columns(tmp_path, inputs, tokenizer):
    source = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "pick:", "good": "yes", "bad": "no"}])
    cfg = load_config(None, ["stage=dpo", "data.chosen_key=good", "data.rejected_key=bad"])
    [pair] = dpo.make_stage(cfg, inputs).load(source, "train")
    assert tokenizer.decode(pair.chosen_ids, skip_special_tokens=True) == "yes"
    assert tokenizer.decode(pair.rejected_ids, skip_special_tokens=True) == "no"


def test_overlength_decides_what_happens_to_long_prompts(tmp_path, inputs, tokenizer):
    source = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "abcdefghij", "response": "x"},
                                                   {"prompt": "abc", "response": "y"}])

    def load(policy: str | None):
        extra = [f"data.overlength={policy}"] if policy else []
        return sft.make_stage(load_config(None, ["stage=sft", "data.max_prompt_len=5"] + extra), inputs).load(
            source, "train")

    with pytest.raises(DataError, match="overlength"):
        load(None)  # default: error
    assert [tokenizer.decode(e.prompt_ids) for e in load("skip")] == ["abc"]
    assert [tokenizer.decode(e.prompt_ids) for e in load("truncate_left")] == ["fghij", "abc"]


def test_sft_turns_last_trains_only_the_final_assistant_turn(tmp_path, inputs, tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "ok"}, {"role": "assistant", "content": "bye"}]
    source = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])

    def trained_text(turns: str | None) -> str:
        extra = [f"data.sft_turns={turns}"] if turns else []
        stage = sft.make_stage(load_config(None, ["stage=sft"] + extra), inputs)
        batch = stage.collate(stage.load(source, "train"))
        ids, mask = batch.input_ids[0, 0], batch.response_mask[0, 0].bool()
        return tokenizer.decode(ids[mask], skip_special_tokens=True)

    assert trained_text(None) == "yobye"  # default 'all': the earlier assistant turn is trained too
    assert trained_text("last") == "bye"


class Started(Exception):
    """Raised where a trainer would start its actors: everything before it (data loading) has run."""


def fake_hub(monkeypatch) -> list[tuple[str, str]]:
    """`datasets.load_dataset(id, split=…)` answered locally: 8 rows in every split; records the calls."""
    calls = []

    def load_dataset(name, split=None, **kwargs):
        calls.append((name, split))
        return datasets.Dataset.from_dict({"prompt": [f"{split} {i}" for i in range(8)],
                                           "response": ["r"] * 8})

    monkeypatch.setattr(sources.datasets, "load_dataset", load_dataset)
    return calls


def test_split_and_eval_split_select_the_hub_splits_of_an_offline_stage(monkeypatch, inputs):
    calls = fake_hub(monkeypatch)
    monkeypatch.setattr(offline, "start_ranks", lambda cfg, stage: (_ for _ in ()).throw(Started()))
    cfg = load_config(None, ["stage=sft", "data.split=dev_a", "data.eval_split=held_b"])
    hub = RunInputs(inputs.models, [], "org/sft", "org/sft")
    with pytest.raises(Started):
        offline.OfflineTrainer(cfg, sft.make_stage(cfg, hub), hub)
    assert calls == [("org/sft", "dev_a"), ("org/sft", "held_b")]


def test_split_and_eval_split_select_the_hub_splits_of_rl_prompts(monkeypatch, inputs):
    calls = fake_hub(monkeypatch)

    def roles(cfg, models, reward_paths, probe_ids):
        raise Started()

    monkeypatch.setattr(ppo, "Roles", roles)
    cfg = load_config(None, ["rollout.backend=hf", "data.split=dev_a", "data.eval_split=held_b"])
    with pytest.raises(Started):
        ppo.PPOTrainer(cfg, RunInputs(inputs.models, [None], "org/prompts", "org/prompts"))
    assert calls == [("org/prompts", "dev_a"), ("org/prompts", "held_b")]
