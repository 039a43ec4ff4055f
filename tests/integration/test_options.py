"""Options that change an RL run, each set to a non-default value and checked by what it does (real Ray +
DeepSpeed + the toy models on CPU): PPO epochs, the clip family, the entropy bonus, γ, the adaptive KL
controller, bucketed weight sync over both CPU transports and its probe tolerance, the evaluation
signals (greedy, pass@k, win-rate), the placement knobs, the iterate loop's cai overrides and
`launch.py --print-config`.

One Ray session for the module. A trainer costs ~20-35 s of start-up on 2 cores, so runs are shared:
`two_epochs` is the reference the clip runs are compared with at step 1 (same seed, so the same
rollouts and the same first epoch; only the option under test differs in the second).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml

from rlhf_ray.algorithms.kl import AdaptiveKLController
from rlhf_ray.config import iterate_stage_configs, load_config
from rlhf_ray.placement import PhaseError, PlacementError
from rlhf_ray.trainers import ppo as ppo_module
from rlhf_ray.trainers.common import prepare_run
from rlhf_ray.trainers.ppo import PPOTrainer
from tests.integration.helpers import (
    engine_states,
    policy_probe,
    policy_weights,
    toy_overrides,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
LR = 3.0e-3  # policy_optim.lr of configs/toy_ppo.yaml
BUCKET_MB = 0.02  # ~20 KiB: the toy policy (~370 KiB) travels in many buckets
# The same seed and data for every run compared at step 1; HF rollouts (weights in the trainer's layout). A
# slow critic: at toy_ppo's 3e-3 one step overshoots its targets, which no value clip ever binds.
COMMON = ("rollout.backend=hf", "trainer.total_steps=3", "trainer.prompts_per_step=8", "trainer.mini_batch_size=8",
          "trainer.micro_batch_size=8", "algo.gamma=0.5", "critic_optim.lr=1.0e-4")
EVAL = ("trainer.eval_greedy=true", "trainer.eval_samples=4", "trainer.eval_pass_k=[1,2,4]",
        "trainer.eval_pass_threshold=0.05", "trainer.eval_win_rate=true")
ADAPTIVE_KL = ("algo.kl.adaptive=true", "algo.kl.target=0.5", "algo.kl.horizon=10")


def _trainer(tmp_path, config: str, *overrides: str) -> PPOTrainer:
    cfg = load_config(CONFIGS / config, toy_overrides(tmp_path, *overrides))
    return PPOTrainer(cfg, prepare_run(cfg))


def _max_step(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(after[k] - before[k]).max()) for k in after)


# ---- shared runs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_epochs(ray_session, tmp_path_factory):
    """GAE + critic, algo.epochs=2, γ=0.5, adaptive KL, greedy pass@k / win-rate evaluation, weights synced in
    ~20 KiB buckets through the object store; 3 steps. Every make_experience call is recorded."""
    trainer = _trainer(tmp_path_factory.mktemp("two_epochs"), "toy_ppo.yaml", *COMMON, "algo.epochs=2",
                       f"rollout.sync_bucket_mb={BUCKET_MB}", *ADAPTIVE_KL, *EVAL)
    experiences, make_experience = [], ppo_module.make_experience

    def recording(samples, scored, scores, cfg, kl_coef):
        exp, metrics = make_experience(samples, scored, scores, cfg, kl_coef)
        experiences.append((samples, scored, scores, kl_coef, exp))
        return exp, metrics

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(ppo_module, "make_experience", recording)
            facts = {"eval0": trainer.evaluate(0), "eval0_again": trainer.evaluate(0),
                     "eval_check": _eval_by_hand(trainer), "before": policy_weights(trainer),
                     "buckets": _buckets(trainer)}
            history = [trainer.train_step(1)]
            facts["after1"] = policy_weights(trainer)
            history += [trainer.train_step(step) for step in (2, 3)]
            facts |= {"history": history, "experiences": experiences, "eval3": trainer.evaluate(3),
                      "engine": _engine_weights(trainer), "after": policy_weights(trainer),
                      "batch_size": trainer.cfg.sequences_per_step}
    finally:
        trainer.close()
    return facts


def _eval_by_hand(trainer: PPOTrainer) -> dict:
    """The eval batch generated and scored directly (greedy, 4 samples, the eval seed): what pass@k and
    the reward mean must be under the configured threshold."""
    prompts = [e.prompt_ids for e in trainer.eval_prompts]
    samples = trainer.roles.generate(prompts, trainer.sampling(greedy=True, n=4), trainer.cfg.rollout.seed + 10**6,
                                     "test", trainer.tokenizer.pad_token_id)
    metadata = [e.metadata for e in trainer.eval_prompts for _ in range(4)]
    scores = trainer.roles.rewards(samples, metadata, "test").scores
    return {"scores": scores.view(-1, 4), "responses": samples.response_ids.view(len(prompts), 4, -1)}


def _buckets(trainer: PPOTrainer) -> list[dict[str, np.ndarray]]:
    """The buckets policy rank 0 puts in the object store for one sync."""
    sent = ray.get(trainer.roles.policy.call(lambda w: w.send_to_object_store.remote(trainer.roles.probe_ids)),
                   timeout=120)
    return ray.get(sent[0][0], timeout=120)


def _engine_weights(trainer: PPOTrainer) -> dict[str, np.ndarray]:
    return ray.get(trainer.roles.pools["rollout"].workers[0].named_weights.remote(), timeout=120)


def _first_step(tmp_path, *overrides: str) -> dict[str, float]:
    trainer = _trainer(tmp_path, "toy_ppo.yaml", *COMMON, "algo.epochs=2", *overrides)
    try:
        return trainer.train_step(1)
    finally:
        trainer.close()


@pytest.fixture(scope="module")
def dual_clip_step(ray_session, tmp_path_factory):
    return _first_step(tmp_path_factory.mktemp("dual"), "algo.dual_clip=1.001")


@pytest.fixture(scope="module")
def tight_clip_step(ray_session, tmp_path_factory):
    return _first_step(tmp_path_factory.mktemp("tight"), "algo.clip_low=0.001", "algo.value_clip=0.0001")


@pytest.fixture(scope="module")
def entropy_run(ray_session, tmp_path_factory):
    """One epoch with the entropy bonus, one torch thread per actor, a 0.75-CPU critic; step 2's sync gets a
    NaN probe from the engine (an injected fault)."""
    tmp = tmp_path_factory.mktemp("entropy")
    faults = {"RLHF_RAY_FAULTS": "nan@rollout.receive_from_object_store#2", "RLHF_RAY_FAULTS_DIR": str(tmp / "faults")}
    with pytest.MonkeyPatch.context() as patch:  # the actors take the fault spec from the environment they start in
        for key, value in faults.items():
            patch.setenv(key, value)
        trainer = _trainer(tmp, "toy_ppo.yaml", *COMMON, "algo.entropy_coef=0.1", "placement.torch_threads=1",
                           "placement.critic.cpus=0.75")
    try:
        before = policy_weights(trainer)
        first = trainer.train_step(1)
        facts = {"first": first, "step_size": _max_step(before, policy_weights(trainer)),
                 "threads": _threads(trainer), "bundles": _bundles(trainer)}
        try:
            facts["nan_sync"] = trainer.train_step(2)
        except PhaseError as err:
            facts["nan_sync"] = err
    finally:
        trainer.close()
    return facts


def _threads(trainer: PPOTrainer) -> dict[str, int]:
    """`role.method` → torch threads of its last call."""
    out = {}
    for role, group in trainer.roles.pools.items():
        for used in group.get(group.call(lambda w: w.last_threads.remote()), "test", "threads", 60):
            out |= {f"{role}.{method}": n for method, n in used.items()}
    return out


def _bundles(trainer: PPOTrainer) -> list[list[dict]]:
    """Each placement group's bundles as Ray granted them, sorted."""
    return sorted(([dict(b) for b in pg.bundle_specs] for pg in trainer.roles._placement_groups.values()),
                  key=lambda bundles: (len(bundles), sorted(bundles[0].items())))


@pytest.fixture(scope="module")
def placement_run(ray_session, tmp_path_factory):
    """GRPO with vLLM engines fed over gloo in ~20 KiB buckets; two reference actors, a reward actor, CPUs set
    per role; no restarts of stateless actors; a probe tolerance no real sync meets (1e-12)."""
    trainer = _trainer(tmp_path_factory.mktemp("placement"), "toy_grpo.yaml", "trainer.total_steps=1",
                       "rollout.backend=vllm", "rollout.weight_sync=gloo", f"rollout.sync_bucket_mb={BUCKET_MB}",
                       "rollout.sync_probe_tol=1e-12", "placement.reference_in_policy=false",
                       "placement.reference.num_workers=2", "placement.reference.cpus=1.5",
                       "placement.reward_in_driver=false", "placement.reward.cpus=0.5", "placement.rollout.cpus=0.25",
                       "placement.max_restarts=0")
    try:
        facts = {"pools": {role: len(pool) for role, pool in trainer.roles.pools.items()},
                 "bundles": _bundles(trainer), "before": policy_weights(trainer)}
        try:
            trainer.train_step(1)
        except PhaseError as err:
            facts["sync_error"] = err
        reference = trainer.roles.pools["reference"]
        facts["reference_busy"] = [busy for busy, _ in ray.get(reference.call(lambda w: w.usage.remote()), timeout=60)]
        facts["engines"], facts["policy_probe"] = engine_states(trainer), policy_probe(trainer)
        facts["step_size"] = _max_step(facts["before"], policy_weights(trainer))
        engine = trainer.roles.pools["rollout"].workers[0]
        ray.kill(engine, no_restart=False)  # Ray would restart it, were any restarts allowed
        time.sleep(2)
        try:
            facts["after_kill"] = ray.get(engine.ping.remote(), timeout=60)
        except ray.exceptions.RayActorError as err:
            facts["after_kill"] = err
    finally:
        trainer.close()
    return facts


# ---- algo: epochs, clips, entropy, γ, adaptive KL ------------------------------------------------


def test_two_epochs_take_two_optimizer_steps_and_the_second_sees_a_moved_policy(two_epochs, entropy_run):
    """One AdamW step moves no weight by more than lr (|m̂/√v̂| ≤ 1 at the first step); two can."""
    assert entropy_run["step_size"] <= LR * (1 + 1e-4)  # algo.epochs=1: one optimizer step
    assert two_epochs["history"][0]["policy/lr"] == LR
    assert _max_step(two_epochs["before"], two_epochs["after1"]) > 1.3 * LR
    first = two_epochs["history"][0]  # metrics of the last epoch: π_θ has moved away from π_old
    assert first["policy/approx_kl"] > 1e-6 and first["policy/ratio_max"] > 1.0 + 1e-4
    assert entropy_run["first"]["policy/approx_kl"] == 0.0 and entropy_run["first"]["policy/ratio_max"] == 1.0


def test_clip_low_clips_the_negative_side_of_the_second_epoch(two_epochs, tight_clip_step):
    base, tight = two_epochs["history"][0], tight_clip_step
    assert tight["reward/score_mean"] == base["reward/score_mean"]  # same rollouts
    # the first epoch (ratio 1) is untouched by the clip range, so the second sees the same ratios
    assert tight["policy/ratio_mean"] == pytest.approx(base["policy/ratio_mean"], rel=1e-6)
    assert tight["policy/ratio_max"] == pytest.approx(base["policy/ratio_max"], rel=1e-6)
    # clip_frac counts A<0 & ρ<1−clip_low: 0.001 instead of 0.2 clips many more tokens
    assert tight["policy/clip_frac"] > base["policy/clip_frac"] + 0.05, (tight["policy/clip_frac"], base["policy/clip_frac"])


def test_value_clip_bounds_the_critics_second_epoch(two_epochs, tight_clip_step):
    base, tight = two_epochs["history"][0], tight_clip_step
    assert tight["critic/values_mean"] == pytest.approx(base["critic/values_mean"], rel=1e-5)
    # clipped where V moved towards its return by more than ε_v: few tokens at 0.2, most at 1e-4
    assert tight["critic/clip_frac"] > base["critic/clip_frac"] + 0.3, (tight["critic/clip_frac"], base["critic/clip_frac"])


def test_dual_clip_caps_the_loss_of_negative_advantages(two_epochs, dual_clip_step):
    """Dual clip only lowers token losses (L_t ≤ c·|A_t| where A_t < 0) and never changes the ratios or
    clip_frac: same second-epoch inputs, strictly lower loss once some A<0 token has ρ > c = 1.001."""
    base, dual = two_epochs["history"][0], dual_clip_step
    assert dual["reward/score_mean"] == base["reward/score_mean"]
    assert dual["policy/ratio_max"] == pytest.approx(base["policy/ratio_max"], rel=1e-6)
    assert dual["policy/clip_frac"] == pytest.approx(base["policy/clip_frac"], abs=1e-9)
    assert dual["policy/loss"] < base["policy/loss"] - 1e-5, (dual["policy/loss"], base["policy/loss"])


def test_entropy_bonus_is_subtracted_from_the_policy_loss(entropy_run):
    """One epoch, one mini-batch: ρ = 1, so the clipped surrogate is −mean(A) and the loss is
    −mean(A) − c_H·H (ALGORITHMS.md §5.4)."""
    m = entropy_run["first"]
    assert m["policy/entropy"] > 1.0
    assert m["policy/loss"] == pytest.approx(-m["adv/mean"] - 0.1 * m["policy/entropy"], abs=1e-5)


def test_gamma_discounts_the_gae_returns(two_epochs):
    """returns = A + V from δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1}, by hand with γ = 0.5, λ = 0.95;
    r_t = −β·k1_t plus the score at the last real token."""
    gamma, lam = 0.5, 0.95
    for samples, scored, scores, beta, exp in two_epochs["experiences"]:
        mask = samples.response_mask.bool()
        k1 = (scored.old_logprobs - scored.ref_logprobs).double()
        values = scored.values.double()
        for i in range(samples.batch_size):
            n = int(mask[i].sum())
            rewards = [-beta * float(k1[i, t]) for t in range(n)]
            rewards[-1] += float(scores[i])
            advantage, next_value, expected = 0.0, 0.0, [0.0] * n
            for t in reversed(range(n)):
                delta = rewards[t] + gamma * next_value - float(values[i, t])
                advantage = delta + gamma * lam * advantage
                expected[t], next_value = advantage + float(values[i, t]), float(values[i, t])
            np.testing.assert_allclose(exp.returns[i, :n].double().numpy(), expected, atol=1e-5, rtol=1e-5)


def test_adaptive_kl_coefficient_follows_the_controller(two_epochs):
    """kl/coef of each step is β before that step's update; the controller fed the logged KL reproduces it."""
    controller = AdaptiveKLController(0.02, 0.5, 10)
    coefs = []
    for m in two_epochs["history"]:
        coefs.append(m["kl/coef"])
        assert m["kl/coef"] == pytest.approx(controller.value, rel=1e-12)
        controller.update(m["kl/ref"], two_epochs["batch_size"])
    assert coefs[0] == 0.02 and abs(coefs[1] / coefs[0] - 1) > 0.1  # horizon 10 moves β by up to 0.2·8/10 per step


def _no_kl_run(tmp_path, *overrides: str) -> dict:
    """Two GRPO steps with β = 0 (the KL in the loss, HF rollouts); what the policy rank holds and did."""
    trainer = _trainer(tmp_path, "toy_grpo.yaml", "rollout.backend=hf", "algo.kl.coef=0", *overrides)
    try:
        before = policy_weights(trainer)
        history = [trainer.train_step(step) for step in (1, 2)]
        rank = trainer.roles.policy.workers[0]
        return {"history": history, "pools": set(trainer.roles.pools), "before": before, "weights": policy_weights(trainer),
                "holds_reference": ray.get(rank.__ray_call__.remote(lambda w: w.reference is not None), timeout=60),
                "busy": ray.get(rank.usage.remote(), timeout=60)[0]}
    finally:
        trainer.close()


def test_without_a_kl_term_no_reference_is_loaded_and_the_update_is_unchanged(ray_session, tmp_path):
    """β = 0 loads no reference: the policy rank holds none and runs no reference forward, no KL metric is
    logged, and the weights equal those of the same run with the reference loaded for the win-rate baseline
    (trainer.eval_win_rate, read only by evaluations, which train_step does not run)."""
    none, loaded = _no_kl_run(tmp_path / "none"), _no_kl_run(tmp_path / "loaded", "trainer.eval_win_rate=true")
    assert not none["holds_reference"] and loaded["holds_reference"]
    assert "reference_logprobs" not in none["busy"] and loaded["busy"]["reference_logprobs"] > 0
    assert "reference" not in none["pools"]
    for metrics in none["history"]:
        assert "kl/ref" not in metrics and "policy/kl_ref" not in metrics and metrics["kl/coef"] == 0
    assert all("kl/ref" in m and "policy/kl_ref" in m for m in loaded["history"])
    assert none["weights"].keys() == loaded["weights"].keys() and _max_step(none["before"], none["weights"]) > 0
    for name, value in none["weights"].items():
        np.testing.assert_array_equal(value, loaded["weights"][name], err_msg=name)


# ---- weight sync ---------------------------------------------------------------------------------


def test_object_store_sync_in_many_buckets_delivers_every_weight(two_epochs):
    buckets, limit = two_epochs["buckets"], int(BUCKET_MB * 2**20)
    assert len(buckets) > 5
    for bucket in buckets:  # at most the limit, unless one tensor is larger on its own
        assert sum(a.nbytes for a in bucket.values()) <= limit or len(bucket) == 1
    names = [name for bucket in buckets for name in bucket]
    assert sorted(names) == sorted(two_epochs["before"])
    assert two_epochs["history"][-1]["sync/version"] == 3 and two_epochs["history"][-1]["sync/probe_gap"] <= 1e-4
    for name, value in two_epochs["after"].items():  # the HF engine holds the policy bit for bit
        np.testing.assert_array_equal(two_epochs["engine"][name], value, err_msg=name)


def test_gloo_sync_in_buckets_reaches_the_engine_and_the_probe_tolerance_is_enforced(placement_run):
    err = placement_run.get("sync_error")
    assert isinstance(err, PhaseError), "the sync passed rollout.sync_probe_tol=1e-12"
    assert (err.phase, err.role, err.step) == ("sync", "rollout[0]", 1)
    assert "rollout.sync_probe_tol=1e-12" in err.cause
    gap = float(re.search(r"differ from the policy's by up to (\S+) ", err.cause).group(1))
    assert 1e-12 < gap < 1e-4, err.cause  # the weights did arrive: the default tolerance would have passed
    (held, probe), = placement_run["engines"]
    assert held == 1  # the engine took version 1 over gloo, bucket by bucket
    np.testing.assert_allclose(probe, placement_run["policy_probe"], atol=1e-4, rtol=0)
    assert placement_run["step_size"] > 0


def test_a_nan_probe_fails_the_sync(entropy_run):
    """An engine whose probe log-probs are NaN does not hold verified weights: NaN is not within any tolerance."""
    outcome = entropy_run["nan_sync"]
    gap = outcome.get("sync/probe_gap") if isinstance(outcome, dict) else None
    assert isinstance(outcome, PhaseError), f"sync passed with sync/probe_gap={gap}"
    assert outcome.phase == "sync"


# ---- evaluation ----------------------------------------------------------------------------------


def test_greedy_eval_pass_at_k_and_win_rate(two_epochs):
    first, again, by_hand = two_epochs["eval0"], two_epochs["eval0_again"], two_epochs["eval_check"]
    assert first == again  # fixed seed: the same policy evaluates the same
    responses, scores = by_hand["responses"], by_hand["scores"]
    assert (responses == responses[:, :1]).all()  # greedy: a prompt's 4 samples are one response
    assert first["eval/reward_mean"] == pytest.approx(scores.mean().item(), abs=1e-6)
    correct = (scores >= 0.05).sum(1).tolist()  # trainer.eval_pass_threshold
    for k in (1, 2, 4):
        expected = np.mean([1.0 if 4 - c < k else 1 - math.comb(4 - c, k) / math.comb(4, k) for c in correct])
        assert first[f"eval/pass@{k}"] == pytest.approx(expected, abs=1e-9)
    assert 0 < first["eval/pass@1"] < 1  # the threshold splits the prompts (the default 1.0 passes none)
    assert first["eval/pass@4"] == first["eval/pass@1"]  # identical samples: more tries cannot help
    assert first["eval/win_rate"] == 0.5  # the initial policy against itself, greedy: every prompt a tie
    final = two_epochs["eval3"]
    assert 0.0 <= final["eval/win_rate"] <= 1.0 and final["eval/win_rate"] != 0.5
    assert final["eval/pass@1"] <= final["eval/pass@2"] <= final["eval/pass@4"]


# ---- placement -----------------------------------------------------------------------------------


def test_placement_sizes_every_role_as_configured(placement_run, entropy_run):
    assert placement_run["pools"] == {"policy": 1, "reference": 2, "reward": 1, "rollout": 1}
    assert placement_run["bundles"] == [[{"CPU": 0.25}], [{"CPU": 0.5}], [{"CPU": 1.0}], [{"CPU": 1.5}, {"CPU": 1.5}]]
    assert all(busy.get("compute_logprobs", 0) > 0 for busy in placement_run["reference_busy"])  # both score a shard
    assert [{"CPU": 0.75}] in entropy_run["bundles"]  # placement.critic.cpus


def test_torch_threads_fixes_every_calls_threads(entropy_run):
    """The per-phase plan would give a lone call (the rollout) the node's whole budget; torch_threads=1 pins it."""
    threads = entropy_run["threads"]
    assert threads["rollout.generate"] == threads["policy.train"] == threads["critic.compute_values"] == 1


def test_max_restarts_zero_leaves_a_killed_engine_dead(placement_run):
    assert isinstance(placement_run["after_kill"], ray.exceptions.RayActorError), placement_run["after_kill"]


def test_placement_timeout_fails_fast_naming_the_request(ray_session, tmp_path):
    cfg = load_config(CONFIGS / "toy_ppo.yaml", toy_overrides(tmp_path, "rollout.backend=hf", "placement.timeout_s=1.5",
                                                               "placement.rollout.cpus=100"))
    inputs = prepare_run(cfg)
    start = time.monotonic()
    with pytest.raises(PlacementError, match=r"placement for rollout not granted within 1.5s: asked 1 bundle\(s\) "
                                             r"of \{'CPU': 100.0\}"):
        PPOTrainer(cfg, inputs)
    assert time.monotonic() - start < 30  # placement.timeout_s, not the default 120 s
    deadline = time.monotonic() + 20  # the policy's group, granted first, is released again
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


# ---- iterate and launch --------------------------------------------------------------------------


def test_iterate_cai_overrides_reach_each_rounds_cai_stage(tmp_path):
    cfg = load_config(CONFIGS / "toy_iterate.yaml", [f"trainer.output_dir={tmp_path}", "iterate.feedback=cai",
                                                     "iterate.cai=[cai.rounds=2, cai.num_prompts=8]"])
    for r in (1, 2):
        stages = iterate_stage_configs(cfg, r, f"/models/policy_{r}")
        assert list(stages) == ["cai", "dpo"]
        cai = stages["cai"]
        assert (cai.stage, cai.cai.rounds, cai.cai.num_prompts) == ("cai", 2, 8)
        assert cai.model.policy == f"/models/policy_{r}" and cai.run_dir == cfg.run_dir / f"round_{r}" / "cai"
        assert stages["dpo"].cai.rounds == 1  # the overrides are the cai stage's alone


def test_print_config_prints_the_effective_config_and_starts_nothing(tmp_path):
    overrides = [f"trainer.output_dir={tmp_path}", "algo.epochs=3", "trainer.name=printed"]
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "launch.py", "--config", str(CONFIGS / "toy_ppo.yaml"), "--print-config",
                           *overrides], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 60
    printed = yaml.safe_load(done.stdout)
    assert printed["algo"]["epochs"] == 3 and printed["trainer"]["name"] == "printed"
    assert printed["trainer"]["prompts_per_step"] == 16  # from the YAML file
    (tmp_path / "printed.yaml").write_text(done.stdout)
    assert load_config(tmp_path / "printed.yaml") == load_config(CONFIGS / "toy_ppo.yaml", overrides)
    assert list(tmp_path.iterdir()) == [tmp_path / "printed.yaml"]  # no run directory: nothing ran
