"""Config of the offline stages and the pipeline: new rules name field, value and fix; the pipeline's
per-stage configs are built (and wired) before anything starts; launch's default is the pipeline."""

from pathlib import Path

import pytest

import launch
from rlhf_ray.config import ConfigError, load_config, pipeline_exports, pipeline_stage_configs
from rlhf_ray.preflight import preflight_problems, stage_needs

ROOT = Path(__file__).resolve().parents[2]
TOY_PIPELINE = ROOT / "configs" / "toy_pipeline.yaml"


@pytest.mark.parametrize("overrides, expected", [
    (["stage=dpo", "dpo.loss=ipo", "dpo.label_smoothing=0.1"],
     "dpo.label_smoothing=0.1 is cDPO's and needs dpo.loss=dpo (got ipo); set dpo.label_smoothing=0 or dpo.loss=dpo."),
    (["stage=dpo", "dpo.label_smoothing=0.5"], "dpo.label_smoothing=0.5"),
    (["stage=rm", "rm.loss=listwise", "rm.margin=1"], "rm.margin=1.0 applies to pairwise losses only (got rm.loss=listwise)"),
    (["stage=rm", "rm.margin=-1"], "rm.margin=-1"),
    (["stage=rm", "dpo.loss=sft"], "dpo.loss='sft'"),
    (["stage=sft", "trainer.micro_batch_size=3"],
     "trainer.mini_batch_size=8 must be a multiple of trainer.micro_batch_size=3 × placement.policy.num_workers=1 = 3 (stage sft)"),
    (["stage=rm", "placement.reward.num_workers=3"], "× placement.reward.num_workers=3 = 12 (stage rm)"),
    (["stage=sft", "pipeline.sft=[trainer.total_steps=3]"],
     "pipeline.sft is set but stage=sft: per-stage overrides apply with stage=pipeline only"),
    (["stage=pipeline", "pipeline.ppo=[model.policy=gpt2]"],
     "pipeline.ppo: override 'model.policy=gpt2' sets model.policy, which the pipeline wires itself"),
    (["stage=pipeline", "pipeline.ppo=[reward.sources.0.path=x]"], "sets reward.sources.0, which the pipeline wires"),
    (["stage=pipeline", "pipeline.rm=[rm.init=gpt2]"], "pipeline.rm: override 'rm.init=gpt2' sets rm.init"),
    (["stage=pipeline", "pipeline.rm=[trainer.micro_batch_size=3]"],
     "pipeline.rm: trainer.mini_batch_size=8 must be a multiple of trainer.micro_batch_size=3 × placement.reward.num_workers=1"),
    (["stage=pipeline", "pipeline.sft=[trainer.totl_steps=3]"], "pipeline.sft: trainer.totl_steps: unknown key; did you mean"),
    (["stage=pipeline", "pipeline.ppo=[algo.advantage=grpo]"], "pipeline.ppo: algo.advantage=grpo compares samples"),
    (["stage=pipeline", "pipeline.sft=[no_equals_sign]"], "is not of the form section.field=value"),
    (["stage=pipeline", "pipeline.stages=[sft, eval]"], "pipeline.stages=['sft', 'eval'] is not a pipeline this runs; "
     "use [sft, rm, ppo] or [sft, ppo], optionally ending with eval."),
    (["stage=pipeline", "pipeline.eval=[eval.temperature=1]"], "pipeline.eval overrides are set but pipeline.stages="),
    (["stage=pipeline", "pipeline.stages=[sft, rm, ppo, eval]", "pipeline.eval=[eval.baseline=x]"],
     "pipeline.eval: override 'eval.baseline=x' sets eval.baseline, which the pipeline wires itself"),
    (["stage=pipeline", "pipeline.stages=[sft, rm, ppo, eval]", "pipeline.eval=[eval.policies.a=toy]"],
     "sets eval.policies, which the pipeline wires"),
])
def test_broken_offline_configs_name_field_value_and_fix(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_every_pipeline_stage_is_checked_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["stage=pipeline", "pipeline.sft=[trainer.micro_batch_size=3]",
                           "pipeline.ppo=[algo.kl.placement=loss]"])
    assert "pipeline.sft: trainer.mini_batch_size=8" in str(err.value)
    assert "pipeline.ppo: algo.kl.placement=loss needs algo.kl.estimator=k3" in str(err.value)


def test_offline_stages_skip_the_rl_batch_rules():
    cfg = load_config(None, ["stage=sft", "trainer.mini_batch_size=32", "trainer.micro_batch_size=16"])
    assert cfg.stage == "sft"  # 32 does not divide prompts_per_step × samples (8): irrelevant offline
    with pytest.raises(ConfigError, match="must divide the sequences per step"):
        load_config(None, ["stage=ppo", "trainer.mini_batch_size=32", "trainer.micro_batch_size=16"])


def test_pipeline_stage_configs_are_wired_to_the_exports(tmp_path):
    cfg = load_config(TOY_PIPELINE, [f"trainer.output_dir={tmp_path}"])
    stages = pipeline_stage_configs(cfg)
    exports = pipeline_exports(cfg)
    assert list(stages) == ["sft", "rm", "ppo"]
    assert [s.stage for s in stages.values()] == ["sft", "rm", "ppo"]
    assert {name: str(s.run_dir) for name, s in stages.items()} == {
        name: str(tmp_path / "toy_pipeline" / name) for name in stages}
    assert exports == {"sft": str(tmp_path / "toy_pipeline/sft/export/policy"),
                       "rm": str(tmp_path / "toy_pipeline/rm/export/reward"),
                       "ppo": str(tmp_path / "toy_pipeline/ppo/export/policy")}
    sft, rm, ppo = stages.values()
    assert sft.model.policy == "toy" and sft.trainer.total_steps == 60 and sft.policy_optim.lr == 3e-3
    assert rm.rm.init == exports["sft"] and rm.reward_optim.lr == 1e-3
    assert (ppo.model.policy, ppo.model.reference, ppo.model.critic) == (exports["sft"], exports["sft"], exports["rm"])
    first, *monitors = ppo.reward.sources
    assert (first.kind, first.path, first.name, first.weight) == ("model", exports["rm"], "rm", 1.0)
    assert [(s.name, s.weight) for s in monitors] == [("vowel", 0.0), ("format", 0.0)]
    assert ppo.reward.missing_eos_penalty == -4.0
    assert sft.checkpoint.export_hf and rm.checkpoint.export_hf


def test_an_eval_stage_judges_the_sft_and_ppo_exports(tmp_path):
    cfg = load_config(TOY_PIPELINE, [f"trainer.output_dir={tmp_path}", "pipeline.stages=[sft, rm, ppo, eval]",
                                     "eval.preference_data=toy", "pipeline.eval=[eval.temperature=1.0]"])
    stages, exports = pipeline_stage_configs(cfg), pipeline_exports(cfg)
    assert list(stages) == ["sft", "rm", "ppo", "eval"] and list(exports) == ["sft", "rm", "ppo"]  # eval exports nothing
    e = stages["eval"]
    assert (e.stage, str(e.run_dir)) == ("eval", str(tmp_path / "toy_pipeline" / "eval"))
    assert e.eval.policies == {"sft": exports["sft"], "ppo": exports["ppo"]} and e.eval.baseline == "sft"
    assert (e.eval.reward_model, e.eval.preference_data, e.eval.temperature) == (exports["rm"], "toy", 1.0)
    assert [(s.name, s.path, s.weight) for s in e.reward.sources] == [
        ("rm", exports["rm"], 1.0), ("vowel", "rlhf_ray.toy.task:vowel_reward", 0.0),
        ("format", "rlhf_ray.toy.task:format_reward", 0.0)]
    # the exports the run writes itself are not pre-flight needs; without an RM stage nothing RM-side is wired
    assert not {n.value for n in stage_needs(cfg)} & set(exports.values())
    no_rm = pipeline_stage_configs(load_config(TOY_PIPELINE, [
        f"trainer.output_dir={tmp_path}", "pipeline.stages=[sft, ppo, eval]", "pipeline.rm=[]",
        "reward.sources=[{kind: function, path: 'rlhf_ray.toy.task:vowel_reward'}]", "pipeline.eval=[eval.reward_model=toy, eval.preference_data=toy]"]))
    assert no_rm["eval"].eval.reward_model == "toy" and no_rm["eval"].reward.sources[0].kind == "function"


def test_a_missing_export_says_which_run_writes_it(tmp_path):
    cfg = load_config(ROOT / "configs" / "toy_eval.yaml", [f"eval.policies.ppo={tmp_path}/toy_pipeline/ppo/export/policy"])
    problems = "\n".join(preflight_problems(cfg))
    assert f"it is what stage 'ppo' of run '{tmp_path}/toy_pipeline' exports: run that first (python launch.py: " \
           f"the toy pipeline)" in problems


def test_launch_defaults_to_the_pipeline_and_sizes_ray_for_its_largest_stage():
    args = launch.parse_args([])
    cfg = load_config(args.config)
    assert Path(args.config) == TOY_PIPELINE and cfg.stage == "pipeline"
    assert launch.required_cpus(cfg) == 4  # the PPO stage: policy (hosting the reference), critic, reward model, one engine
    sft = load_config(None, ["stage=sft", "placement.policy.num_workers=2", "placement.policy.cpus=0.5"])
    assert launch.required_cpus(sft) == 1.0
    own = ["placement.reference_in_policy=false", "placement.reference.num_workers=2"]
    assert launch.required_cpus(load_config(None, own)) == 5  # policy, 2 reference actors, critic, engine (a rule reward: in the driver)
    assert launch.required_cpus(load_config(None, [*own, "algo.kl.coef=0"])) == 3  # β = 0: no reference actors
