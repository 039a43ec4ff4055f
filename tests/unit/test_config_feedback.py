"""Config of the feedback, cai, label and iterate stages: each new rule names field, value and fix;
the iterate loop's per-round stage configs are wired (directories, seeds, models, data) and checked
before anything starts; launch sizes Ray for each new stage."""

from pathlib import Path

import pytest

import launch
from rlhf_ray.config import ConfigError, iterate_paths, iterate_stage_configs, load_config

ROOT = Path(__file__).resolve().parents[2]
TOY_ITERATE = ROOT / "configs" / "toy_iterate.yaml"


@pytest.mark.parametrize("overrides, expected", [
    (["stage=label", "rollout.max_new_tokens=32"],
     "data.max_response_len=32 must exceed rollout.max_new_tokens=32: responses stage label generates (up to 32 "
     "tokens + EOS) would be cut when trained on; set data.max_response_len=33 or more."),
    (["stage=cai", "data.max_response_len=8"], "data.max_response_len=8 must exceed rollout.max_new_tokens=16"),
    (["stage=label", "label.labeler.judge={mode: grade, on_unparseable: tie}"],
     "label.labeler.judge.mode=grade: labelling asks the judge to compare two responses in both orders; "
     "set label.labeler.judge.mode=compare."),
    (["stage=cai", "cai.pairs=judge", "label.labeler={kind: judge, path: toy}"], "label.labeler.judge.mode=None"),
    (["stage=label", "label.labeler={kind: model}"], "label.labeler: kind=model needs path"),
    (["stage=label", "label.pairs_per_prompt=0"], "label.pairs_per_prompt=0"),
    (["stage=label", "label.on_disagreement=keep"], "label.on_disagreement='keep'"),
    (["stage=cai", "cai.rounds=0"], "cai.rounds=0"),
    (["stage=feedback", "feedback.rating_scale=1"], "feedback.rating_scale=1"),
    (["stage=feedback", "feedback.ratings_as=lists"], "feedback.ratings_as='lists'"),
    (["stage=dpo", "iterate.dpo=[trainer.total_steps=3]"],
     "iterate.dpo is set but stage=dpo: per-stage overrides apply with stage=iterate only; remove the iterate "
     "section or set stage=iterate."),
    (["stage=iterate", "pipeline.sft=[trainer.total_steps=3]"], "pipeline.sft is set but stage=iterate"),
    (["stage=pipeline", "iterate.label=[label.num_prompts=3]"], "iterate.label is set but stage=pipeline"),
    (["stage=iterate", "iterate.dpo=[model.policy=gpt2]"],
     "iterate.dpo: override 'model.policy=gpt2' sets model.policy, which the iterate loop wires itself; remove it"),
    (["stage=iterate", "iterate.dpo=[data.train=x.jsonl]"], "iterate.dpo: override 'data.train=x.jsonl' sets data.train"),
    (["stage=iterate", "iterate.train=rm_ppo", "iterate.ppo=[reward.sources.0.weight=2]"], "sets reward.sources, which"),
    (["stage=iterate", "iterate.train=rm_ppo", "iterate.rm=[rm.init=gpt2]"], "iterate.rm: override 'rm.init=gpt2'"),
    (["stage=iterate", "iterate.dpo=[trainer.micro_batch_size=3]"],
     "iterate.dpo: trainer.mini_batch_size=8 must be a multiple of trainer.micro_batch_size=3"),
    (["stage=iterate", "iterate.label=[rollout.max_new_tokens=40]"], "iterate.label: data.max_response_len=32 must exceed"),
    (["stage=iterate", "dpo.loss=kto"],
     "iterate.dpo: dpo.loss=kto does not read preference pairs, which is what each round makes; "
     "use dpo.loss=dpo|ipo|simpo|orpo."),
    (["stage=iterate", "iterate.train=rm_ppo", "iterate.rm=[rm.loss=listwise]"], "iterate.rm: rm.loss=listwise does not"),
    (["stage=iterate", "iterate.rounds=0"], "iterate.rounds=0"),
])
def test_broken_configs_name_field_value_and_fix(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_data_stages_skip_the_rl_and_training_rules():
    # 3 does not divide 8 sequences per step: an RL rule, irrelevant to stages that train nothing
    for stage in ("feedback", "cai", "label"):
        assert load_config(None, [f"stage={stage}", "trainer.mini_batch_size=3"]).stage == stage


def test_round_configs_are_wired(tmp_path):
    cfg = load_config(TOY_ITERATE, [f"trainer.output_dir={tmp_path}", "trainer.seed=5"])
    run = tmp_path / "toy_iterate"
    stages = iterate_stage_configs(cfg, 2, "/exports/round1", prompts=("/p/train.jsonl", "/p/eval.jsonl"))
    label, dpo = stages["label"], stages["dpo"]
    assert list(stages) == ["label", "dpo"]
    assert [str(s.run_dir) for s in (label, dpo)] == [str(run / "round_2" / "label"), str(run / "round_2" / "dpo")]
    assert label.model.policy == dpo.model.policy == "/exports/round1"
    assert label.trainer.seed == dpo.trainer.seed == 6  # seed + (round − 1)
    assert (label.data.train, label.data.eval) == ("/p/train.jsonl", "/p/eval.jsonl")
    assert (dpo.data.train, dpo.data.eval) == (str(run / "round_2" / "label" / "pairs.jsonl"), None)
    assert label.label.labeler.kind == "function" and label.label.num_prompts == 64
    assert (dpo.trainer.total_steps, dpo.policy_optim.lr, dpo.model.reference) == (30, 3e-3, None)
    assert iterate_paths(cfg, 2) == {"dir": str(run / "round_2"), "pairs": str(run / "round_2" / "label" / "pairs.jsonl"),
                                     "policy": str(run / "round_2" / "dpo" / "export" / "policy"), "reward": None}


def test_rm_ppo_rounds_chain_the_reward_model(tmp_path):
    cfg = load_config(TOY_ITERATE, [f"trainer.output_dir={tmp_path}", "iterate.train=rm_ppo", "iterate.feedback=cai"])
    round2 = tmp_path / "toy_iterate" / "round_2"
    stages = iterate_stage_configs(cfg, 2, "/exports/policy1", reward_model="/exports/rm1")
    assert list(stages) == ["cai", "rm", "ppo"]
    rm, ppo = stages["rm"], stages["ppo"]
    assert rm.rm.init == "/exports/rm1" and rm.data.train == str(round2 / "cai" / "pairs.jsonl")
    assert iterate_stage_configs(cfg, 1, "/p0")["rm"].rm.init is None  # round 1: rm.init (null: the round's policy)
    assert ppo.model.policy == "/exports/policy1" and ppo.model.critic == str(round2 / "rm" / "export" / "reward")
    first, *monitors = ppo.reward.sources
    assert (first.kind, first.path, first.weight) == ("model", str(round2 / "rm" / "export" / "reward"), 1.0)
    assert [(s.name, s.weight) for s in monitors] == [("vowel", 0.0)]  # reward.sources: logged, not optimised
    assert ppo.trainer.total_steps == 5 and rm.checkpoint.export_hf and ppo.checkpoint.export_hf


def test_launch_sizes_ray_for_the_new_stages():
    label = load_config(ROOT / "configs" / "toy_label.yaml")
    assert launch.required_cpus(label) == 2  # one engine + the labeller (which also scores the evaluation)
    assert launch.required_cpus(load_config(ROOT / "configs" / "toy_cai.yaml")) == 1  # engines only: no eval, no judge
    assert launch.required_cpus(load_config(ROOT / "configs" / "toy_cai.yaml", ["cai.pairs=judge"])) == 2
    assert launch.required_cpus(load_config(TOY_ITERATE)) == 2
    assert launch.required_cpus(load_config(TOY_ITERATE, ["iterate.train=rm_ppo"])) == 4  # PPO: policy (+ reference), critic, RM, engine


def test_a_dotted_override_keeps_the_rest_of_a_non_default_section():
    # critic_optim's default lr (5e-5) differs from OptimConfig's; label.labeler's from RewardSourceConfig's
    assert load_config(None, ["critic_optim.weight_decay=0.1"]).critic_optim.lr == 5e-5
    labeler = load_config(None, ["stage=label", "label.labeler.judge.max_new_tokens=4"]).label.labeler
    assert (labeler.kind, labeler.path, labeler.judge.mode, labeler.judge.max_new_tokens) == ("judge", "toy", "compare", 4)


def test_a_finished_round_from_another_policy_is_refused(tmp_path):
    import json

    from rlhf_ray.trainers.iterate import RoundRecord, finished_round

    cfg = load_config(TOY_ITERATE, [f"trainer.output_dir={tmp_path}"])
    assert finished_round(cfg, 1, "/p0") is None
    record = RoundRecord(1, "/p0", "/p1", None, "/pairs", 10, None, {}, "sha", {}, 1.0)
    path = tmp_path / "toy_iterate" / "round_1" / "round.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record.__dict__))
    assert finished_round(cfg, 1, "/p0") == record
    with pytest.raises(RuntimeError, match="records round 1 as started from /p0, but this run's round 1 starts from /other"):
        finished_round(cfg, 1, "/other")
