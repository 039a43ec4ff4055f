"""Feedback ingestion (stage `feedback`): a file of feedback records → the datasets the stages train
on, with what each conversion kept and dropped (`rlhf_ray.data.feedback`). Runs on the driver
alone: no Ray actors, no model.

    python launch.py --config configs/toy_feedback.yaml        # → runs/toy_feedback/{pairs,kto,sft,critiques}.jsonl
    python launch.py --config configs/toy_dpo.yaml data.train=runs/toy_feedback/pairs.jsonl data.eval=null
"""

from __future__ import annotations

from typing import Any

from rlhf_ray.config import TOY, RunConfig, dump_config
from rlhf_ray.data.feedback import convert_feedback
from rlhf_ray.metrics import summary_table

TOY_FEEDBACK_PROMPTS = 32  # prompts of toy feedback (7 records each)


def run_feedback(cfg: RunConfig) -> dict[str, Any]:
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    source = cfg.feedback.input
    if source == TOY:
        from rlhf_ray.toy.feedback import write_toy_feedback

        source = write_toy_feedback(run_dir / "toy" / "feedback.jsonl", cfg.trainer.seed, TOY_FEEDBACK_PROMPTS)
    f = cfg.feedback
    result = convert_feedback(source, run_dir, ratings_as=f.ratings_as, min_gap=f.min_rating_gap,
                              rating_scale=f.rating_scale, on_bad_row=cfg.data.on_bad_row)
    rows = [("read", str(result.read))] + [(f"{r.kind} → {r.output}", _counts(r)) for r in result.conversions]
    rows += [(f"wrote {name}", path) for name, path in result.files.items()]
    print(summary_table(rows, title="== Feedback summary =="), flush=True)
    return {"files": result.files, "read": result.read, "conversions": result.conversions}


def _counts(report) -> str:
    text = f"{report.records_in} in, {report.rows_out} out"
    return text + ("; dropped " + ", ".join(f"{k}={v}" for k, v in sorted(report.dropped.items())) if report.dropped else "")
