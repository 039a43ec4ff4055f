"""From feedback to training data on CPU with real Ray actors and the toy models: the Constitutional AI
stage (rounds, the conversations built from the constitution, given critiques, SFT and pair
outputs), AI preference labelling with a judge asked in both orders, and two iterative DPO rounds
whose second starts from the first's exported model (checked by path and by the engines' weights),
rerun to show finished rounds are skipped.

One Ray session for the module; each stage starts its own actors (~5-10 s each on 2 cores), so
every run is shared by the assertions about it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from rlhf_ray.config import JudgeSourceConfig, load_config
from rlhf_ray.data import load_preferences, load_sft, render_messages
from rlhf_ray.data.constitution import critique_messages, load_constitution, revision_messages, sample_principles
from rlhf_ray.models import load_tokenizer
from rlhf_ray.rewards import parse_choice
from rlhf_ray.rollout.base import probe_tokens
from rlhf_ray.rollout.hf import HFRolloutEngine
from rlhf_ray.trainers.cai import run_cai
from rlhf_ray.trainers.iterate import run_iterate, weights_sha256
from rlhf_ray.trainers.label import run_label

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "say: hi\n"}]
GIVEN = [{"kind": "critique", "prompt": "say: abc\n", "response": "xyz", "critique": "Too few vowels."},
         {"kind": "rating", "prompt": "say: abc\n", "response": "xyz", "rating": 2},  # not a critique: ignored
         {"kind": "critique", "prompt": CHAT, "response": "hmm", "critique": "Use letters."}]


def _cfg(tmp_path, name: str, *overrides: str):
    return load_config(CONFIGS / name, [f"trainer.output_dir={tmp_path}", "logging.progress_bar=false",
                                        "data.toy_train_size=128", "data.toy_eval_size=16", *overrides])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _probe_sum(model_dir: str) -> float:
    """What `RolloutWorker.weight_state` reports for a model: its summed log-probs of the probe sequence."""
    tokenizer = load_tokenizer(model_dir)
    engine = HFRolloutEngine(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer)
    return float(engine.probe_logprobs(probe_tokens(len(tokenizer))).sum())


# ---- Constitutional AI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cai_run(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cai")
    given = tmp / "critiques.jsonl"
    given.write_text("".join(json.dumps(r) + "\n" for r in GIVEN))
    cfg = _cfg(tmp, "toy_cai.yaml", "cai.num_prompts=8", "cai.rounds=2", f"cai.critiques={given}")
    return cfg, run_cai(cfg)


def test_cai_runs_every_round_with_prompts_built_from_the_constitution(cai_run):
    cfg, report = cai_run
    tok = load_tokenizer(str(cfg.run_dir / "toy" / "models" / "policy"))
    constitution = load_constitution(cfg.run_dir / "toy" / "constitution.yaml")
    principles = {p.name: p for p in constitution.principles} | {"feedback": constitution.feedback}
    trace = _rows(cfg.run_dir / "trace.jsonl")
    assert (report["prompts"], report["given_critiques"], report["rounds"]) == (8, 2, 2)
    assert len(trace) == 10 and [t["origin"] for t in trace[8:]] == [f"{cfg.cai.critiques}:1", f"{cfg.cai.critiques}:3"]
    assert report["finished"] == sum(t["dropped"] is None for t in trace) >= 8
    for t in trace:
        response = t["draft"]
        for k, step in enumerate(t["steps"], start=1):
            p = principles[step["principle"]]
            if step["critique_prompt"] is not None:  # the model's own critique
                assert step["critique_prompt"] == render_messages(tok, critique_messages(t["prompt"], response, p))
            revision_prompt = render_messages(tok, revision_messages(t["prompt"], response, p, step["critique"]))
            assert step["revision_prompt"] == revision_prompt
            assert p.critique in revision_prompt and p.revision in revision_prompt and step["critique"] in revision_prompt
            response = step["revision"]
        assert t["final"] == response
        if t["dropped"] is None:
            assert len(t["steps"]) == 2
    # round k's principles: sampled with (trainer.seed, k) over the examples still live, in order
    for k in (1, 2):
        live = [t for t in trace if t["draft"] and len(t["steps"]) >= k - 1 and all(s["revision"].strip()
                                                                                    for s in t["steps"][:k - 1])]
        drawn = [p.name for p in sample_principles(constitution, len(live), cfg.trainer.seed, k)]
        used = [t["steps"][k - 1]["principle"] for t in live if len(t["steps"]) >= k]
        expected = [("feedback" if k == 1 and t["given_critique"] else d) for t, d in zip(live, drawn)
                    if len(t["steps"]) >= k]
        assert used == expected


def test_cai_given_critiques_stand_in_for_the_first_critique(cai_run):
    cfg, _ = cai_run
    given = _rows(cfg.run_dir / "trace.jsonl")[8:]
    assert [(t["prompt"], t["draft"], t["given_critique"]) for t in given] == [
        ("say: abc\n", "xyz", "Too few vowels."), (CHAT, "hmm", "Use letters.")]
    for t in given:
        first = t["steps"][0]
        assert (first["principle"], first["critique_prompt"], first["critique"]) == ("feedback", None, t["given_critique"])
        assert first["revision_prompt"].startswith(
            "<|system|>be brief</s><|user|>say: hi\n</s><|assistant|>hmm</s><|user|>Critique it.</s>"
            if t["prompt"] == CHAT else "<|user|>say: abc\n</s><|assistant|>xyz</s><|user|>Critique it.</s>")


def test_cai_writes_sft_data_and_revision_pairs_the_loaders_read(cai_run):
    cfg, report = cai_run
    finished = [t for t in _rows(cfg.run_dir / "trace.jsonl") if t["dropped"] is None]
    assert _rows(cfg.run_dir / "sft.jsonl") == [{"prompt": t["prompt"], "response": t["final"]} for t in finished]
    assert _rows(cfg.run_dir / "pairs.jsonl") == [
        {"prompt": t["prompt"], "chosen": t["final"], "rejected": t["draft"], "source": "cai"}
        for t in finished if t["final"] != t["draft"]]
    tok = load_tokenizer(str(cfg.run_dir / "toy" / "models" / "policy"))
    options = {"max_prompt_len": cfg.data.max_prompt_len, "max_response_len": cfg.data.max_response_len}
    assert len(load_sft(report["sft_file"], tok, **options)[0]) == report["sft_rows"] == len(finished)
    assert len(load_preferences(report["pairs_file"], tok, **options)[0]) == report["pair_rows"]


# ---- AI preference labelling -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def label_run(ray_session, tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("label"), "toy_label.yaml", "label.num_prompts=8", "label.pairs_per_prompt=2",
               "label.labeler.judge.on_unparseable=tie", "label.on_disagreement=tie", "data.eval=null")
    return cfg, run_label(cfg)


def test_label_asks_the_judge_both_orders_and_reports_the_counts(label_run):
    cfg, report = label_run
    judged = _rows(cfg.run_dir / "judgements.jsonl")
    template = JudgeSourceConfig().compare_template
    assert report["samples"] == 8 * 4 and report["pairs"] == len(judged)
    assert report["pairs"] + sum(report["skipped_before_labelling"].values()) == 8 * 2
    for row in judged:
        a, b = row["response_a"], row["response_b"]
        assert row["queries"] == [template.format(prompt=row["prompt"], response_a=a, response_b=b),
                                  template.format(prompt=row["prompt"], response_a=b, response_b=a)]
        results = [None if (c := parse_choice(r)) is None else 0.5 if c == "tie" else float((c == "A") != swapped)
                   for r, swapped in zip(row["replies"], (False, True))]
        assert row["orders"] == results
    orders = [row["orders"] for row in judged]
    assert report["unparseable_orders"] == sum(o is None for pair in orders for o in pair) > 0  # a random judge
    both = [o for o in orders if None not in o]
    assert report["agreement"] == (sum(x == y for x, y in both) / len(both) if both else None)
    assert report["kept"] + sum(report["dropped"].values()) == report["pairs"]
    # on_unparseable=tie and on_disagreement=tie: a pair is kept only when its mean verdict is not ½
    means = [sum(0.5 if w is None else w for w in o) / 2 for o in orders]
    assert report["kept"] == sum(m != 0.5 for m in means)
    assert report["policy_probe_logprob"] == pytest.approx(_probe_sum(report["policy"]), rel=1e-5)


# ---- Iterative rounds ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iterate_runs(ray_session, tmp_path_factory):
    """Two rounds of label → DPO → evaluate, then the same command again (both rounds finished: skipped)."""
    cfg = _cfg(tmp_path_factory.mktemp("iterate"), "toy_iterate.yaml", "label.num_prompts=32", "trainer.eval_prompts=16",
               "iterate.dpo=[trainer.total_steps=20, trainer.mini_batch_size=16, trainer.micro_batch_size=16, "
               "policy_optim.lr=3.0e-3]")
    first = run_iterate(cfg)
    exports = [Path(r.policy_out) / "model.safetensors" for r in first["rounds"]]
    mtimes = [p.stat().st_mtime_ns for p in exports]
    again = run_iterate(cfg)
    return cfg, first, again, mtimes, exports


def test_the_second_round_starts_from_the_first_rounds_model(iterate_runs):
    cfg, first, _, _, _ = iterate_runs
    one, two = first["rounds"]
    run_dir = cfg.run_dir
    assert one.policy_in == str(run_dir / "toy" / "models" / "policy")
    assert one.policy_out == two.policy_in == str(run_dir / "round_1" / "dpo" / "export" / "policy")
    assert two.policy_out == first["final_policy"] == str(run_dir / "round_2" / "dpo" / "export" / "policy")
    for stage in ("label", "dpo"):  # each stage of round 2 was configured with round 1's export, seed + 1
        stage_cfg = yaml.safe_load((run_dir / "round_2" / stage / "config.yaml").read_text())
        assert stage_cfg["model"]["policy"] == one.policy_out and stage_cfg["trainer"]["seed"] == cfg.trainer.seed + 1
    dpo_cfg = yaml.safe_load((run_dir / "round_2" / "dpo" / "config.yaml").read_text())
    assert dpo_cfg["data"]["train"] == two.pairs == str(run_dir / "round_2" / "label" / "pairs.jsonl")
    # the engines that sampled round 2's pairs held round 1's exported weights
    label_reports = [json.loads((run_dir / f"round_{r}" / "label" / "report.json").read_text()) for r in (1, 2)]
    assert label_reports[0]["policy_probe_logprob"] == pytest.approx(_probe_sum(one.policy_in), rel=1e-5)
    assert label_reports[1]["policy_probe_logprob"] == pytest.approx(_probe_sum(one.policy_out), rel=1e-5)
    assert two.policy_in_sha256 == weights_sha256(one.policy_out) != weights_sha256(two.policy_out)
    assert one.train["dpo/last_loss"] < one.train["dpo/first_loss"]


def test_each_policy_is_evaluated_and_the_vowel_share_rises(iterate_runs):
    cfg, first, _, _, _ = iterate_runs
    one, two = first["rounds"]
    evaluations = [one.eval_policy_in, two.eval_policy_in, first["final_eval"]]
    assert all({"eval/reward_mean", "eval/vowel_mean", "eval/length_mean"} <= set(e) for e in evaluations)
    assert json.loads((cfg.run_dir / "evaluation.json").read_text())["eval"] == first["final_eval"]
    vowel = [e["eval/vowel_mean"] for e in evaluations]
    assert vowel[2] > vowel[0] + 0.05, vowel  # the synthetic annotator prefers vowels; DPO follows
    pairs = _rows(Path(two.pairs))
    assert len(pairs) == two.pairs_kept >= 16
    assert all(sum(c in "aeiou" for c in p["chosen"]) / len(p["chosen"]) >
               sum(c in "aeiou" for c in p["rejected"]) / len(p["rejected"]) for p in pairs)


def test_a_rerun_skips_finished_rounds(iterate_runs):
    _, first, again, mtimes, exports = iterate_runs
    assert again["rounds"] == first["rounds"] and again["final_policy"] == first["final_policy"]
    assert [p.stat().st_mtime_ns for p in exports] == mtimes  # nothing retrained
    assert again["final_eval"] == pytest.approx(first["final_eval"])  # the same policy, prompts and seed
    assert torch.isfinite(torch.tensor(list(again["final_eval"].values()))).all()
