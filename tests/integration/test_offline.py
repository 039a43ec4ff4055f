"""Offline stages on CPU with real Ray actors, real DeepSpeed ranks and the toy models: SFT, the
reward model (pairwise, listwise, ranked pairs) and every DPO-family loss; exports reload with
`from_pretrained`; the exported reward model scores like PPO's reward source; 2 ranks = 1 rank;
bad preference rows stop the stage naming file and row before any actor starts.

One Ray session for the module; each run starts its own ranks (~5 s per actor).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf_ray.config import load_config
from rlhf_ray.data import DataError
from rlhf_ray.models import load_tokenizer
from rlhf_ray.rewards.model import ModelReward
from rlhf_ray.toy.task import format_reward
from rlhf_ray.trainers.dpo import run_dpo
from rlhf_ray.trainers.rm import run_rm
from rlhf_ray.trainers.sft import run_sft

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _cfg(tmp_path, name: str, *overrides: str):
    return load_config(CONFIGS / name, [f"trainer.output_dir={tmp_path}", "logging.progress_bar=false",
                                        "trainer.eval_every=0", *overrides])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


# ---- SFT ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(ray_session, tmp_path_factory):
    """Two data-parallel ranks (ZeRO-2), two micro-batches each per optimizer step."""
    cfg = _cfg(tmp_path_factory.mktemp("sft"), "toy_sft.yaml", "trainer.total_steps=40", "trainer.eval_every=20",
               "placement.policy.num_workers=2", "trainer.micro_batch_size=8")
    return cfg, run_sft(cfg)


def test_sft_loss_falls_on_held_out_data(sft_run):
    cfg, result = sft_run
    before, after = result["eval_before"]["eval/nll"], result["eval_after"]["eval/nll"]
    assert before == pytest.approx(math.log(103), abs=0.3)  # a random model over 103 tokens
    assert after < before - 1.3, (before, after)
    assert result["last_loss"] < result["first_loss"] - 1.0
    history = _rows(cfg.run_dir / "metrics.jsonl")
    assert [h["step"] for h in history] == list(range(1, 41))
    assert "eval/nll" in history[19] and "eval/nll" in history[39] and "eval/nll" not in history[20]
    assert all(np.isfinite(h["sft/grad_norm"]) and h["sft/lr"] == 3e-3 for h in history)


def test_sft_export_reloads_and_has_learned_the_format(sft_run):
    cfg, result = sft_run
    policy = AutoModelForCausalLM.from_pretrained(result["export"]).eval()
    tokenizer = load_tokenizer(result["export"])
    rows = _rows(cfg.run_dir / "toy" / "data" / "sft_eval.jsonl")
    nll, tokens = 0.0, 0
    with torch.no_grad():  # the export is the trained model: its eval NLL is the run's last eval
        for row in rows:
            prompt = tokenizer.encode(row["prompt"])
            response = tokenizer.encode(row["response"], add_special_tokens=False) + [tokenizer.eos_token_id]
            logits = policy(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
            nll -= torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum().item()
            tokens += len(response)
    assert nll / tokens == pytest.approx(result["eval_after"]["eval/nll"], abs=1e-4)
    prompts = [r["prompt"] for r in rows[:32]]
    torch.manual_seed(0)
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    out = policy.generate(**batch, max_new_tokens=16, do_sample=True, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)[:, batch["input_ids"].shape[1]:]
    stopped = [(row == tokenizer.eos_token_id).any().item() for row in out]
    texts = [tokenizer.decode(row[: (row == tokenizer.eos_token_id).nonzero()[0, 0]] if s else row, skip_special_tokens=True)
             for row, s in zip(out, stopped)]
    share = np.mean(format_reward(prompts, texts, [{"stopped": s} for s in stopped]))
    assert share >= 0.75, list(zip(texts, stopped))  # lowercase letters, then EOS (a random model: ~0)


# ---- reward model ------------------------------------------------------------------------------


def test_reward_model_beats_chance_and_scores_like_the_ppo_reward_source(ray_session, tmp_path):
    cfg = _cfg(tmp_path, "toy_rm.yaml")
    result = run_rm(cfg)
    after = result["eval_after"]
    assert result["eval_before"]["eval/accuracy"] < 0.65
    assert after["eval/accuracy"] >= 0.75, after  # 64 held-out pairs; chance is 0.5
    assert after["eval/margin"] > 1.0 and result["last_loss"] < 0.4
    assert AutoModelForSequenceClassification.from_pretrained(result["export"]).config.num_labels == 1
    source = ModelReward(result["export"])  # exactly how PPO loads a `kind: model` reward source
    rows = _rows(cfg.run_dir / "toy" / "data" / "preference_eval.jsonl")
    prompts = [r["prompt"] for r in rows]
    chosen = np.array(source.score(prompts, [r["chosen"] for r in rows], [{}] * len(rows)))
    rejected = np.array(source.score(prompts, [r["rejected"] for r in rows], [{}] * len(rows)))
    assert np.mean(chosen > rejected) == pytest.approx(after["eval/accuracy"])
    assert np.mean(chosen - rejected) == pytest.approx(after["eval/margin"], abs=1e-4)
    assert np.mean(np.concatenate([chosen, rejected])) == pytest.approx(after["eval/score_mean"], abs=1e-4)


@pytest.mark.parametrize("loss", ["listwise", "ranked_pairs"])
def test_reward_model_on_rankings_trains(ray_session, tmp_path, loss):
    cfg = _cfg(tmp_path, "toy_rm.yaml", f"rm.loss={loss}", "trainer.total_steps=25", "checkpoint.export_hf=false",
               "trainer.mini_batch_size=16", "trainer.micro_batch_size=8")
    result = run_rm(cfg)
    before, after = result["eval_before"], result["eval_after"]
    assert after["eval/loss"] < before["eval/loss"] - 0.1, (before, after)
    key = "eval/pair_accuracy" if loss == "listwise" else "eval/accuracy"
    assert after[key] > 0.65, after
    assert _finite(after) and result["export"] is None


# ---- DPO family ----------------------------------------------------------------------------------


def test_dpo_increases_the_chosen_vs_rejected_margin(ray_session, tmp_path):
    result = run_dpo(_cfg(tmp_path, "toy_dpo.yaml"))
    before, after = result["eval_before"], result["eval_after"]
    assert before["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)  # θ = reference exactly
    assert before["eval/rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert after["eval/rewards/margin"] > 0.5 and after["eval/rewards/accuracy"] > 0.8, after
    assert after["eval/rewards/chosen"] > after["eval/rewards/rejected"]
    assert after["eval/loss"] < 0.5
    assert AutoModelForCausalLM.from_pretrained(result["export"]).config.vocab_size == 103


def test_dpo_against_a_separate_reference_model(sft_run, tmp_path):
    """model.reference = the SFT export, policy = the random toy model: ℓ_ref comes from the other model."""
    _, sft = sft_run
    cfg = _cfg(tmp_path, "toy_dpo.yaml", f"model.reference={sft['export']}", "trainer.total_steps=3",
               "checkpoint.export_hf=false", "trainer.eval_prompts=16")
    result = run_dpo(cfg)
    policy = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "toy" / "models" / "policy").eval()
    reference = AutoModelForCausalLM.from_pretrained(sft["export"]).eval()
    tokenizer = load_tokenizer(sft["export"])
    rows = _rows(cfg.run_dir / "toy" / "data" / "preference_eval.jsonl")[:16]

    def logprob(model, prompt: str, response: str) -> float:
        p = tokenizer.encode(prompt)
        r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
        logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1]
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).sum().item()

    with torch.no_grad():
        h = [(logprob(policy, x["prompt"], x["chosen"]) - logprob(reference, x["prompt"], x["chosen"]))
             - (logprob(policy, x["prompt"], x["rejected"]) - logprob(reference, x["prompt"], x["rejected"]))
             for x in rows]
    expected = float(np.mean([math.log1p(math.exp(-0.1 * v)) for v in h]))  # −log σ(β·h), β = 0.1
    assert result["eval_before"]["eval/loss"] == pytest.approx(expected, abs=1e-4)
    assert abs(expected - math.log(2)) > 0.01  # a reference other than the policy


def _response_logprobs(model, tokenizer, prompt: str, response: str) -> tuple[float, int]:
    """(Σ log π(y|x) over the response and its EOS, number of those tokens): the stage's ℓ(y) and |y|."""
    p = tokenizer.encode(prompt)
    r = tokenizer.encode(response, add_special_tokens=False) + [tokenizer.eos_token_id]
    with torch.no_grad():
        logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).sum().item(), len(r)


def _preferred_margins(cfg, result, loss: str) -> list[float]:
    """Per eval example, how much more the trained policy raised (vs the initial policy, its reference)
    the log-prob of the preferred response than of the other: (ℓ_θ − ℓ_0)(preferred) − (ℓ_θ − ℓ_0)(other),
    per token for the length-averaged variants. KTO (unpaired): one number, desirable mean − undesirable
    mean. RRHF: best-ranked vs worst-ranked candidate."""
    policy = AutoModelForCausalLM.from_pretrained(result["export"]).eval()
    initial = AutoModelForCausalLM.from_pretrained(cfg.run_dir / "toy" / "models" / "policy").eval()
    tokenizer = load_tokenizer(result["export"])
    per_token = loss in ("ipo", "simpo", "orpo", "rrhf")

    def log_ratio(prompt: str, response: str) -> float:
        (theta, n), (zero, _) = (_response_logprobs(m, tokenizer, prompt, response) for m in (policy, initial))
        return (theta - zero) / n if per_token else theta - zero

    data = cfg.run_dir / "toy" / "data"
    if loss == "kto":
        rows = _rows(data / "kto_eval.jsonl")[:48]
        ratios = [(log_ratio(x["prompt"], x["response"]), x["label"]) for x in rows]
        good, bad = [r for r, d in ratios if d], [r for r, d in ratios if not d]
        return [float(np.mean(good) - np.mean(bad))]
    if loss == "rrhf":
        rows = _rows(data / "ranked_eval.jsonl")[:24]
        return [log_ratio(x["prompt"], x["responses"][int(np.argmax(x["scores"]))])
                - log_ratio(x["prompt"], x["responses"][int(np.argmin(x["scores"]))]) for x in rows]
    rows = _rows(data / "preference_eval.jsonl")[:32]
    return [log_ratio(x["prompt"], x["chosen"]) - log_ratio(x["prompt"], x["rejected"]) for x in rows]


@pytest.mark.parametrize("config, overrides", [
    ("toy_dpo.yaml", ("dpo.label_smoothing=0.1",)),  # cDPO
    ("toy_dpo.yaml", ("dpo.loss=ipo",)),
    ("toy_dpo.yaml", ("dpo.loss=simpo", "dpo.beta=2.0")),
    ("toy_dpo.yaml", ("dpo.loss=orpo",)),
    ("toy_kto.yaml", ()),
    ("toy_rrhf.yaml", ()),
], ids=["cdpo", "ipo", "simpo", "orpo", "kto", "rrhf"])
def test_each_dpo_family_loss_raises_the_preferred_response(ray_session, tmp_path, config, overrides):
    """Orientation, measured outside the stage: after training, the preferred response's log-prob rose
    relative to the other's (a variant with chosen and rejected swapped lowers its own loss too, but
    fails here). Also: the stage's own eval loss fell, every logged metric is finite."""
    cfg = _cfg(tmp_path, config, "trainer.total_steps=10", *overrides)
    result = run_dpo(cfg)
    margins = _preferred_margins(cfg, result, cfg.dpo.loss)
    assert np.mean(margins) > 0, margins
    assert np.mean([m > 0 for m in margins]) > 0.5, margins
    before, after = result["eval_before"], result["eval_after"]
    assert after["eval/loss"] < before["eval/loss"], (before, after)
    assert result["last_loss"] < result["first_loss"]
    history = _rows(cfg.run_dir / "metrics.jsonl")
    assert len(history) == 10 and all(_finite(h) for h in history)


@pytest.mark.parametrize("config", ["toy_dpo.yaml", "toy_kto.yaml"])
def test_offline_stage_resumed_mid_run_equals_the_uninterrupted_run(ray_session, tmp_path, config):
    """run_dpo → fit, 4 steps, a checkpoint after each; then fit again from step 2's checkpoint: the
    reference log-probs come from the checkpoint (the policy has moved, so recomputing them would change
    every later loss), and steps 3-4, the final evaluation and the exported policy equal the first run's."""
    common = ("trainer.total_steps=4", "trainer.eval_every=2", "checkpoint.every=1", "checkpoint.keep_last=10",
              "trainer.mini_batch_size=16", "trainer.micro_batch_size=8", "policy_optim.lr=3e-3")
    first_cfg = _cfg(tmp_path / "a", config, *common)
    first = run_dpo(first_cfg)
    step_2 = first_cfg.run_dir / "checkpoints" / "step_00000002"
    assert {"train_ref", "eval_ref"} <= set(load_file(step_2 / "driver_tensors.safetensors"))
    resumed_cfg = _cfg(tmp_path / "b", config, *common, f"checkpoint.resume={step_2}")
    resumed = run_dpo(resumed_cfg)
    a, b = _rows(first_cfg.run_dir / "metrics.jsonl"), _rows(resumed_cfg.run_dir / "metrics.jsonl")
    assert [r["step"] for r in b] == [3, 4]
    for want, got in zip(a[2:], b):
        for key, value in want.items():
            if not key.startswith("time/"):
                assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (got["step"], key)
    assert resumed["eval_after"]["eval/loss"] == pytest.approx(first["eval_after"]["eval/loss"], rel=1e-6)
    assert resumed["eval_before"] == pytest.approx(first["eval_before"], rel=1e-9)  # kept in the checkpoint
    want, got = load_file(f"{first['export']}/model.safetensors"), load_file(f"{resumed['export']}/model.safetensors")
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_kto_two_ranks_zero3_equal_one_rank(ray_session, tmp_path):
    """Same seed and data: 2 ranks (ZeRO-3, collective forwards, an odd eval set) = 1 rank (ZeRO-2)."""
    common = ("trainer.total_steps=3", "trainer.mini_batch_size=16", "trainer.eval_prompts=63",
              "checkpoint.export_hf=false")
    one = run_dpo(_cfg(tmp_path / "one", "toy_kto.yaml", *common, "trainer.micro_batch_size=16"))
    two = run_dpo(_cfg(tmp_path / "two", "toy_kto.yaml", *common, "trainer.micro_batch_size=4",
                       "placement.policy.num_workers=2", "deepspeed.zero_stage=3"))
    losses = [[h["dpo/loss"] for h in _rows(tmp_path / run / "toy_kto" / "metrics.jsonl")] for run in ("one", "two")]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for key, value in one["eval_after"].items():
        if key.startswith("eval/"):
            assert two["eval_after"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert one["eval_after"]["eval/loss"] < one["eval_before"]["eval/loss"]


# ---- bad rows: named by file and row, before any actor starts --------------------------------------


GOOD = {"prompt": "say: ab\n", "chosen": "aeiou", "rejected": "zzz"}


@pytest.mark.parametrize("bad, reason, key", [
    ({"prompt": "say: ab\n", "chosen": "aeiou"}, "missing_key", "rejected"),
    ({"prompt": "say: ab\n", "rejected": "zzz"}, "missing_key", "chosen"),
    ({"prompt": "say: ab\n", "chosen": "aeiou", "rejected": "aeiou"}, "identical_pair", "rejected"),
    ({"prompt": "say: ab\n", "chosen": "", "rejected": "zzz"}, "empty", "chosen"),
    ({"prompt": "", "chosen": "aeiou", "rejected": "zzz"}, "empty", "prompt"),
], ids=["no-rejected", "no-chosen", "identical", "empty-chosen", "empty-prompt"])
@pytest.mark.parametrize("run, stage", [(run_rm, "rm"), (run_dpo, "dpo")], ids=["rm", "dpo"])
def test_bad_preference_rows_are_reported_by_file_and_row(tmp_path, bad, reason, key, run, stage):
    data = tmp_path / "prefs.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in [GOOD, GOOD, bad, GOOD]) + "\n")
    cfg = load_config(CONFIGS / f"toy_{stage}.yaml", [f"trainer.output_dir={tmp_path}", f"data.train={data}",
                                                      "data.eval=null", "trainer.mini_batch_size=2",
                                                      "trainer.micro_batch_size=2"])
    with pytest.raises(DataError) as err:
        run(cfg)
    assert (err.value.source, err.value.row, err.value.key, err.value.reason) == (str(data), 3, key, reason)
    assert f"{data}, row 3, key '{key}'" in str(err.value)
