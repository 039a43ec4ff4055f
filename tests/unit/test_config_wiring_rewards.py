"""Reward, judge, labelling and feedback fields reach what scores and labels: the workers built from the
config in-process (`RewardWorker`, `LabelWorker`, no Ray), the label stage's `label_pairs`, the
feedback stage's `run_feedback`, and the RL score shaping `shape_scores`.

The judge is the toy policy (random weights) behind HF generate: its replies are noise, so the
tests read what it was asked (the rendered prompts and token ids) and use on_unparseable=tie."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_ray.config import load_config
from rlhf_ray.rewards import RewardError
from rlhf_ray.toy import build_char_tokenizer, build_policy
from rlhf_ray.trainers.experience import RunningMoments, shape_scores
from rlhf_ray.trainers.feedback import run_feedback
from rlhf_ray.trainers.label import label_pairs
from rlhf_ray.workers import LabelWorker, ModelPaths, RewardWorker


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> str:
    """A causal LM with its tokenizer (which has a chat template), as a 'toy' judge resolves to."""
    path = tmp_path_factory.mktemp("judge")
    tokenizer = build_char_tokenizer()
    build_policy(tokenizer, seed=0, hidden_size=32, intermediate_size=32, num_layers=1, num_heads=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def paths(judge_dir: str) -> ModelPaths:
    return ModelPaths(judge_dir, judge_dir, judge_dir, judge_dir)


JUDGE_SOURCE = ["rollout.backend=hf", "reward.sources.0.kind=judge", "reward.sources.0.path=toy",
                "reward.sources.0.name=judge", "reward.sources.0.judge.max_new_tokens=1"]


def spy(engine) -> list[list[int]]:
    """Record the prompt token ids of every `engine.generate` call."""
    asked, generate = [], engine.generate

    def recording(prompts, *args, **kwargs):
        asked.extend(prompts)
        return generate(prompts, *args, **kwargs)

    engine.generate = recording
    return asked


def reward_worker(judge_dir: str, overrides: list[str]) -> tuple[RewardWorker, object]:
    worker = RewardWorker(load_config(None, JUDGE_SOURCE + overrides), paths(judge_dir), [judge_dir])
    return worker, worker.sources.sources[0]


# ---- reward.sources.0.judge ---------------------------------------------------------------------


def test_reward_judge_reference_key_names_the_baseline_column(judge_dir):
    _, judge = reward_worker(judge_dir, ["reward.sources.0.judge.mode=compare", "reward.sources.0.judge.on_unparseable=tie",
                                         "reward.sources.0.judge.reference_key=baseline"])
    judge.score(["p"], ["mine"], [{"baseline": "THEIRS", "reference": "other"}])
    assert "THEIRS" in judge.last_queries[0].prompt and "other" not in judge.last_queries[0].prompt
    with pytest.raises(RewardError, match="baseline"):
        judge.score(["p"], ["mine"], [{"reference": "other"}])


def test_reward_judge_chat_template_false_sends_the_raw_prompt(judge_dir):
    for flag, wrapped in (("true", True), ("false", False)):
        _, judge = reward_worker(judge_dir, ["reward.sources.0.judge.on_unparseable=tie",
                                             f"reward.sources.0.judge.chat_template={flag}"])
        asked = spy(judge.engine)
        judge.score(["p"], ["r"], [{}])
        text = judge.tokenizer.decode(asked[0])
        assert text.startswith("<|user|>") is wrapped and text.endswith("<|assistant|>") is wrapped
        assert judge.last_queries[0].prompt in text


def test_reward_batch_size_caps_the_rows_of_each_judge_generate(judge_dir):
    _, judge = reward_worker(judge_dir, ["reward.sources.0.judge.on_unparseable=tie", "reward.batch_size=2"])
    rows, generate = [], judge.engine.model.generate
    judge.engine.model.generate = lambda **kw: rows.append(kw["input_ids"].shape[0]) or generate(**kw)
    judge.score(["p"] * 5, ["r"] * 5, [{}] * 5)
    assert rows == [2, 2, 1]


# ---- label.labeler.judge and label.min_score_gap -------------------------------------------------


def label_worker(judge_dir: str, overrides: list[str]) -> LabelWorker:
    cfg = load_config(None, ["rollout.backend=hf", "label.labeler.judge.max_new_tokens=1"] + overrides)
    return LabelWorker(cfg, paths(judge_dir), judge_dir)


def test_labeler_chat_template_false_sends_the_raw_compare_prompts(judge_dir):
    for flag, wrapped in (("true", True), ("false", False)):
        worker = label_worker(judge_dir, [f"label.labeler.judge.chat_template={flag}"])
        asked = spy(worker.labeler.source.engine)
        [judgement] = worker.label(["p"], ["aa"], ["bb"], [{}], [{}])
        texts = [worker.labeler.source.tokenizer.decode(ids) for ids in asked]
        assert len(texts) == 2  # both orders
        for text, query in zip(texts, judgement.queries):
            assert text.startswith("<|user|>") is wrapped and query in text


def test_labeler_grade_template_and_reference_key_shape_its_judge_source(judge_dir):
    """The labeller's judge source honours its grade options (label.labeler is a reward source config; the
    label stage itself only compares, so these matter where the labeller scores, e.g. in grade mode)."""
    worker = label_worker(judge_dir, ["label.labeler.judge.mode=grade", "label.labeler.judge.on_unparseable=tie",
                                      "label.labeler.judge.grade_template='Grade {response} now:'"])
    judge = worker.labeler.source
    judge.score(["p"], ["xyz"], [{}])
    assert judge.last_queries[0].prompt == "Grade xyz now:"

    worker = label_worker(judge_dir, ["label.labeler.judge.reference_key=gold"])
    judge = worker.labeler.source
    judge.score(["p"], ["mine"], [{"gold": "GOLDEN"}])
    assert "GOLDEN" in judge.last_queries[0].prompt
    with pytest.raises(RewardError, match="gold"):
        judge.score(["p"], ["mine"], [{"reference": "x"}])


def test_min_score_gap_turns_close_scorer_pairs_into_dropped_ties(judge_dir):
    scorer = ["label.labeler.kind=function", "label.labeler.path=rlhf_ray.toy.task:vowel_reward",
              "label.labeler.name=vowels", "label.labeler.judge=null"]
    # vowel shares: "aaaa" 1.0 vs "aaab" 0.75 (gap 0.25); "aaaa" vs "bbbb" 0.0 (gap 1)
    args = (["p", "q"], ["aaaa", "aaaa"], ["aaab", "bbbb"], [True, True], [True, True])
    for gap, reasons in ((None, ["kept", "kept"]), ("0.3", ["tie", "kept"])):
        overrides = scorer + ([f"label.min_score_gap={gap}"] if gap else [])
        cfg = load_config(None, ["rollout.backend=hf"] + overrides)
        worker = LabelWorker(cfg, paths(judge_dir), cfg.label.labeler.path)
        _, decisions = label_pairs(worker, cfg, *args)  # the worker answers `label` as the session does
        assert [d.reason for d in decisions] == reasons
        assert decisions[1].choice == "A"


# ---- feedback.min_rating_gap ----------------------------------------------------------------------


def test_min_rating_gap_sets_which_ratings_become_pairs(tmp_path):
    feedback = tmp_path / "feedback.jsonl"
    ratings = {"best": 5, "good": 4, "poor": 2}
    feedback.write_text("".join(json.dumps({"kind": "rating", "prompt": "q", "response": r, "rating": v}) + "\n"
                                for r, v in ratings.items()))

    def pairs(gap: str | None) -> set[tuple[str, str]]:
        overrides = [f"trainer.output_dir={tmp_path}", "stage=feedback", f"feedback.input={feedback}"]
        cfg = load_config(None, overrides + ([f"feedback.min_rating_gap={gap}"] if gap else []))
        rows = [json.loads(line) for line in Path(run_feedback(cfg)["files"]["pairs"]).read_text().splitlines()]
        return {(row["chosen"], row["rejected"]) for row in rows}

    assert pairs(None) == {("best", "good"), ("best", "poor"), ("good", "poor")}  # default gap 1
    assert pairs("2") == {("best", "poor"), ("good", "poor")}


# ---- reward.overlong_penalty ----------------------------------------------------------------------


def test_overlong_penalty_is_the_score_lost_at_max_new_tokens():
    cfg = load_config(None, ["rollout.max_new_tokens=16", "reward.overlong_buffer=4", "reward.overlong_penalty=0.5"])
    lengths = torch.tensor([12, 14, 16])  # 0, 2 and 4 tokens into the 4-token buffer
    shaped = shape_scores(torch.ones(3), torch.ones(3, dtype=torch.bool), lengths, cfg, RunningMoments())
    assert shaped.tolist() == pytest.approx([1.0, 1.0 - 0.25, 1.0 - 0.5])
