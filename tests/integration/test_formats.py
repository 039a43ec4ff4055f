"""Published dataset schemas train through the real stage entry points with no key remapping (toy
models, Ray, DeepSpeed on CPU): SFT on multi-turn `messages`, DPO on Anthropic HH-RLHF transcripts,
KTO on unpaired conversational rows (`completion`, `label`), and the reward model on UltraFeedback
binarized pairs with its margin taken from their scores. 3 steps each, one Ray session."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rlhf_ray.config import load_config
from rlhf_ray.trainers.dpo import run_dpo
from rlhf_ray.trainers.rm import run_rm
from rlhf_ray.trainers.sft import run_sft

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
WORDS = ["red", "blue", "green", "gold", "grey", "pink", "teal", "plum"]


def _run(run, tmp_path, config, rows, *overrides):
    """Train 3 steps on `rows` (8 of them: one mini-batch), no eval, no export; the result and the step metrics."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = load_config(CONFIGS / config, [
        f"trainer.output_dir={tmp_path}", f"data.train={data}", "data.eval=null", "logging.progress_bar=false",
        "trainer.total_steps=3", "trainer.eval_every=0", "trainer.mini_batch_size=8", "trainer.micro_batch_size=8",
        "checkpoint.export_hf=false", "data.max_prompt_len=128", *overrides])
    result = run(cfg)
    history = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(math.isfinite(v) for h in history for v in h.values() if isinstance(v, float))
    return result, history


def user(content):
    return {"role": "user", "content": content}


def assistant(content):
    return {"role": "assistant", "content": content}


def test_sft_on_multi_turn_messages(ray_session, tmp_path):
    rows = [{"messages": [user("hi"), assistant("hello"), user(f"say {w}"), assistant(w)]} for w in WORDS]
    result, _ = _run(run_sft, tmp_path, "toy_sft.yaml", rows)
    assert result["last_loss"] < result["first_loss"]


def test_dpo_on_hh_rlhf_transcripts(ray_session, tmp_path):
    rows = [{"chosen": f"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name a colour\n\nAssistant: {w}",
             "rejected": f"\n\nHuman: hi\n\nAssistant: hello\n\nHuman: name a colour\n\nAssistant: no {w}"}
            for w in WORDS]
    result, _ = _run(run_dpo, tmp_path, "toy_dpo.yaml", rows)
    assert result["first_loss"] == pytest.approx(math.log(2), abs=1e-5)  # the policy is its reference at step 1
    assert result["last_loss"] < result["first_loss"]


def test_kto_on_unpaired_conversational_rows(ray_session, tmp_path):
    rows = [{"prompt": [user(f"colour {i}?")], "completion": [assistant(w)], "label": i % 2 == 0}
            for i, w in enumerate(WORDS)]
    _, history = _run(run_dpo, tmp_path, "toy_kto.yaml", rows)
    assert "dpo/kl" in history[0]


def test_reward_model_on_ultrafeedback_with_margins_from_scores(ray_session, tmp_path):
    rows = [{"prompt": f"name colour {i}", "prompt_id": str(i), "chosen": [user(f"name colour {i}"), assistant(w)],
             "rejected": [user(f"name colour {i}"), assistant("table")],
             "messages": [user(f"name colour {i}"), assistant(w)], "score_chosen": 9.0, "score_rejected": 4.0}
            for i, w in enumerate(WORDS)]
    result, _ = _run(run_rm, tmp_path, "toy_rm.yaml", rows, "data.margin_from_scores=true")
    # −log σ(r_c − r_r − 5) with r_c ≈ r_r at the start: about softplus(5) ≈ 5.0, not log 2.
    assert result["first_loss"] > 4.0
