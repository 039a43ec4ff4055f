"""Config loading, overrides and validation: every broken config gets its own specific message."""

from pathlib import Path

import pytest
from pydantic import BaseModel

from rlhf_ray.config import (
    ConfigError,
    HttpSourceConfig,
    JudgeSourceConfig,
    RewardSourceConfig,
    RunConfig,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_are_valid_and_describe_every_field():
    cfg = load_config()
    assert cfg.stage == "ppo" and cfg.model.policy == "toy"

    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no help text"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")

    walk(RunConfig, "")


def test_yaml_then_cli_overrides_apply_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer:\n  total_steps: 7\n  name: from_yaml\nrollout:\n  temperature: 0.7\n")
    cfg = load_config(path, ["trainer.total_steps=3", "algo.kl.coef=1e-2", "reward.sources.0.weight=2.5"])
    assert cfg.trainer.total_steps == 3  # CLI wins
    assert cfg.trainer.name == "from_yaml"  # YAML kept
    assert cfg.rollout.temperature == 0.7
    assert cfg.algo.kl.coef == pytest.approx(0.01)  # "1e-2" coerced to float
    assert cfg.reward.sources[0].weight == 2.5 and cfg.reward.sources[0].name == "vowel"


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["trainer.total_steps=4", "algo.advantage=grpo", "rollout.samples_per_prompt=4"])
    path = tmp_path / "dump.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("overrides, expected", [
    (["trainer.totl_steps=5"], "trainer.totl_steps: unknown key; did you mean 'trainer.total_steps'?"),
    (["modle.policy=x"], "modle: unknown key; did you mean 'model'?"),
    (["algo.kl.coeff=0.1"], "did you mean 'algo.kl.coef'?"),
    (["rollout.temperature=0"], "rollout.temperature=0: Input should be greater than 0"),
    (["trainer.total_steps=many"], "trainer.total_steps='many'"),
    (["rollout.backend=tpu"], "rollout.backend='tpu'"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage=4"),
    (["algo.advantage=grpo"], "algo.advantage=grpo compares samples of the same prompt and needs rollout.samples_per_prompt >= 2"),
    (["algo.advantage=rloo", "rollout.samples_per_prompt=1"], "set rollout.samples_per_prompt=4"),
    (["trainer.mini_batch_size=3"], "trainer.mini_batch_size=3 must divide the sequences per step"),
    (["trainer.micro_batch_size=3"], "must be a multiple of trainer.micro_batch_size=3 × placement.policy.num_workers=1"),
    (["placement.policy.num_workers=3"], "placement.policy.num_workers=3"),
    (["deepspeed.offload_params=true"], "deepspeed.offload_params=true needs deepspeed.zero_stage=3 (got 2)"),
    (["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"], "deepspeed.offload_optimizer=true needs deepspeed.zero_stage >= 1"),
    (["algo.kl.placement=loss"], "algo.kl.placement=loss needs algo.kl.estimator=k3"),
    (["algo.clip_high=0.1"], "algo.clip_high=0.1 is below algo.clip_low=0.2"),
    (["rollout.backend=vllm", "model.toy.num_heads=4"], "model.toy.num_heads=4 gives head size 16"),
    (["rollout.backend=vllm", "model.toy.hidden_size=96", "model.toy.num_heads=6"], "use model.toy.num_heads=3"),
    (["rollout.vllm.enable_sleep=true"], "rollout.vllm.enable_sleep=true: vLLM's sleep mode needs GPUs"),
    (["rollout.vllm.tensor_parallel_size=2", "placement.rollout.gpus=1", "rollout.weight_sync=nccl",
      "placement.policy.gpus=1"], "rollout.vllm.tensor_parallel_size=2 needs that many GPUs per engine"),
    (["rollout.vllm.tensor_parallel_size=2", "placement.rollout.gpus=2"], "set rollout.weight_sync=nccl"),
    (["rollout.weight_sync=nccl"], "rollout.weight_sync=nccl needs GPUs on the policy and the engines"),
    (["stage=rm", "data.margin_from_scores=true", "rm.loss=listwise"], "data.margin_from_scores=true takes each pair's margin"),
    (["rollout.weight_sync=cuda_ipc"], "rollout.weight_sync=cuda_ipc needs the policy and the engines on the same GPUs"),
    (["rollout.weight_sync=cuda_ipc", "placement.policy.gpus=1", "placement.rollout.gpus=1", "rollout.num_engines=2",
      "placement.colocate=[[policy, rollout]]"], "feeds engine r from policy rank r: set rollout.num_engines=1"),
    (["rollout.num_engines=9"], "rollout.num_engines=9 exceeds trainer.prompts_per_step=8"),
    (["placement.colocate=[[policy, judge]]"], "placement.colocate names unknown role 'judge'"),
    (["placement.colocate=[[policy], [policy, reference]]"], "lists role 'policy' in more than one group"),
    (["placement.rollout.num_workers=2"], "the number of engines is rollout.num_engines"),
    (["placement.colocate=[[policy, reference]]", "placement.reference_in_policy=false", "placement.policy.strategy=spread"],
     "placement.colocate group ['policy', 'reference'] mixes strategies or labels (policy: spread {}, reference: pack {})"),
    (["placement.colocate=[[policy, rollout]]", "placement.rollout.labels={pool: serve}"], "give them the same placement.<role>.strategy and labels"),
    (["placement.critic.resources={CPU: 1}"], "placement.critic.resources={'CPU': 1.0}: custom resources only, each > 0"),
    (["placement.reward.resources={node_b: 0}"], "placement.reward.resources={'node_b': 0.0}: custom resources only"),
    (["placement.policy.strategy=scatter"], "placement.policy.strategy='scatter'"),
    (["trainer.max_restarts=2"], "trainer.max_restarts=2 restarts from the latest checkpoint, but checkpoint.every=0"),
    (["model.toy.num_heads=3"], "model.toy.num_heads=3 must divide model.toy.hidden_size=64"),
    (["data.max_prompt_len=0"], "data.max_prompt_len=0"),
    (["reward.sources.3.weight=1"], "'3' is not an index of a list of 1 items"),
    (["reward.sources.0.kind=rm"], "reward.sources.0.kind='rm'"),
    (["reward.sources.0.path=null"], "reward.sources.0: kind=function needs path (got None); set path to module.path:function"),
    (["reward.sources.0.kind=judge", "reward.sources.0.path=null"], "kind=judge needs path (got None); set path to a causal LM"),
    (["reward.sources.0.kind=http", "reward.sources.0.path=null"], "reward.sources.0: kind=http needs http.url (got null)"),
    (["reward.sources.0.kind=http", "reward.sources.0.http.url=http://127.0.0.1:8000/score"],
     "reward.sources.0: path='rlhf_ray.toy.task:vowel_reward' is unused for kind=http; put the endpoint in http.url"),
    (["reward.sources.0.kind=http", "reward.sources.0.path=null", "reward.sources.0.http.url=ftp://host/score"],
     "reward.sources.0.http: url='ftp://host/score' is not an http(s) URL"),
    (["reward.sources.0.http.url=http://127.0.0.1:8000/score"], "reward.sources.0: http options are set but kind=function; remove http or set kind=http"),
    (["reward.sources.0.judge.mode=grade"], "judge options are set but kind=function"),
    (["reward.sources.0.kind=http", "reward.sources.0.path=null", "reward.sources.0.http.url=http://h/score",
      "reward.sources.0.http.retries=-1"], "reward.sources.0.http.retries=-1"),
    (["reward.sources.0.kind=judge", "reward.sources.0.judge.on_unparseable=drop-order"],
     "reward.sources.0.judge: on_unparseable=drop-order needs mode=compare"),
    (["reward.sources.0.kind=judge", "reward.sources.0.judge.on_unparseable=zero"], "reward.sources.0.judge.on_unparseable='zero'"),
    (["reward.sources.0.kind=judge", "reward.sources.0.judge.min_score=5", "reward.sources.0.judge.max_score=5"],
     "min_score=5.0 must be below max_score=5.0"),
    (["reward.sources.0.kind=judge", "reward.sources.0.judge.compare_template='Which is better?'"],
     "compare_template lacks the placeholders ['response_a', 'response_b']"),
    (["reward.sources.0.kind=judge", "reward.sources.0.judge.grade_template='{prompt} {answer}'"],
     "grade_template uses unknown placeholders ['answer']; allowed:"),
    (["reward.sources.0.kind=judge", "reward.sources.0.judge.grade_template='{response'"], "grade_template is not a valid format string"),
    (["reward.sources.0.kind=judge", "reward.sources.0.judge.max_new_tokens=0"], "reward.sources.0.judge.max_new_tokens=0"),
    (["trainer.total_steps"], "is not of the form section.field=value"),
    (["placement.reference.gpus=1"], "is unused: with placement.reference_in_policy=true (the default)"),
    (["placement.reward_in_driver=true", "reward.sources.0.kind=model", "reward.sources.0.path=toy"],
     "placement.reward_in_driver=true, but reward source(s) ['vowel'] hold a model"),
    (["algo.max_staleness=2", "rollout.weight_sync=gloo"], "set rollout.weight_sync=object_store or algo.max_staleness <= 1"),
    (["algo.max_staleness=-1"], "algo.max_staleness=-1"),
    (["algo.off_policy_objective=decoupled", "algo.rollout_correction=tis"], "needs stale samples: set algo.max_staleness >= 1"),
    (["algo.off_policy_objective=decoupled", "algo.max_staleness=1"], "set algo.rollout_correction=tis"),
    (["rollout.update_in_flight=mid_request"], "set algo.max_staleness >= 1 or rollout.update_in_flight=between_requests"),
    (["rollout.update_in_flight=mid_request", "algo.max_staleness=1", "rollout.weight_sync=gloo"],
     "through rollout.weight_sync=object_store only (got gloo)"),
    (["rollout.segment_tokens=0"], "rollout.segment_tokens=0"),
])
def test_broken_configs_name_field_value_and_fix(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_reward_source_kinds_validate_describe_and_round_trip(tmp_path):
    for model in (RewardSourceConfig, HttpSourceConfig, JudgeSourceConfig):
        for name, field in model.model_fields.items():
            assert field.description and not field.is_required(), f"{model.__name__}.{name} needs help text and a default"
    path = tmp_path / "rewards.yaml"
    path.write_text("reward:\n  sources:\n"
                    "    - {kind: http, name: remote, http: {url: 'http://10.0.0.5:8000/score', token_env: RM_TOKEN}}\n"
                    "    - {kind: judge, path: toy, weight: 0.5, judge: {mode: compare, on_unparseable: drop-order}}\n")
    cfg = load_config(path)
    http, judge = cfg.reward.sources
    assert http.http.url == "http://10.0.0.5:8000/score" and http.http.retries == 3 and http.judge is None
    assert judge.judge.mode == "compare" and judge.judge.max_new_tokens == 16
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


def test_several_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["deepspeed.offload_params=true", "algo.kl.placement=loss"])
    message = str(err.value)
    assert "offload_params" in message and "algo.kl.placement=loss" in message


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy)


def test_shipped_configs_are_valid():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert configs, "configs/ holds no YAML files"
    for path in configs:
        load_config(path)


def test_derived_sizes():
    cfg = load_config(None, ["rollout.samples_per_prompt=4", "algo.advantage=grpo", "trainer.prompts_per_step=4",
                             "trainer.mini_batch_size=8", "trainer.micro_batch_size=2", "placement.policy.num_workers=2"])
    assert cfg.sequences_per_step == 16
    assert cfg.grad_accum_steps("policy") == 2
    assert not cfg.uses_critic


def test_partial_sections_keep_their_own_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("critic_optim:\n  weight_decay: 0.1\n")
    cfg = load_config(path, ["policy_optim.warmup_steps=2"])
    assert cfg.critic_optim.lr == 5e-5 and cfg.critic_optim.weight_decay == 0.1
    assert cfg.policy_optim.lr == 1e-5 and cfg.policy_optim.warmup_steps == 2


def test_one_step_off_policy_is_max_staleness_one():
    """The field before asynchronous RL keeps working: true is max_staleness 1, false leaves it alone."""
    assert load_config(None, ["algo.one_step_off_policy=true"]).algo.max_staleness == 1
    assert load_config(None, ["algo.one_step_off_policy=false"]).algo.max_staleness == 0
    assert load_config(None, ["algo.one_step_off_policy=true", "algo.max_staleness=3"]).algo.max_staleness == 3
    with pytest.raises(ConfigError, match="must be true or false"):
        load_config(None, ["algo.one_step_off_policy=2"])


def test_which_updates_reuse_their_forward_for_old_logprobs_and_where_light_roles_run():
    grpo = ["algo.advantage=grpo", "rollout.samples_per_prompt=4", "trainer.prompts_per_step=4",
            "trainer.mini_batch_size=16", "algo.kl.placement=loss", "algo.kl.estimator=k3"]
    assert load_config(None, grpo).reuses_training_logprobs
    for extra in (["algo.epochs=2"], ["trainer.mini_batch_size=8"], ["algo.kl.placement=reward"],
                  ["algo.recompute_old_logprobs=true"], ["algo.max_staleness=1"]):
        assert not load_config(None, grpo + extra).reuses_training_logprobs, extra
    assert load_config(None, []).reward_in_driver  # the default rule-function source
    model_rm = ["reward.sources.0.kind=model", "reward.sources.0.path=toy"]
    assert not load_config(None, model_rm).reward_in_driver
    assert not load_config(None, ["placement.reward_in_driver=false"]).reward_in_driver


@pytest.mark.parametrize("overrides, expected", [
    (["algo.rollout_correction=is"], "algo.rollout_correction='is'"),
    (["algo.tis_cap=0"], "algo.tis_cap=0: Input should be greater than 0"),
    (["algo.correction_low=0"], "algo.correction_low=0.0 must be > 0"),
    (["algo.correction_low=2", "algo.correction_high=1.5"], "algo.correction_low=2.0 must be below algo.correction_high=1.5"),
    (["algo.rollout_correction=tis", "algo.max_staleness=2"], "algo.rollout_correction=tis does nothing with"),
])
def test_rollout_correction_configs_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert expected in str(err.value)


def test_rollout_correction_defaults_and_choices():
    assert load_config(None, []).algo.rollout_correction == "none"
    cfg = load_config(None, ["algo.rollout_correction=sequence_mask", "algo.correction_low=0.8",
                             "algo.correction_high=1.25"])
    assert (cfg.algo.rollout_correction, cfg.algo.correction_low, cfg.algo.correction_high) == ("sequence_mask", 0.8, 1.25)
