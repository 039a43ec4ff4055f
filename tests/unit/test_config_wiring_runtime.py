"""Run-time sections reach what they steer: `logging` the metric sinks (`MetricsLogger`, built from
cfg.logging as every trainer does), `checkpoint.allow_incompatible_resume` the resume check
(`RunCheckpoints.restore`), and `placement` the actors of the data stages' `SamplingSession`
(reservation and start-up deadline, restarts, threads: recorded by stand-ins for Ray's pool and placement)."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import pytest

from rlhf_ray.checkpoint import CheckpointError
from rlhf_ray.config import load_config
from rlhf_ray.metrics import MetricsLogger
from rlhf_ray.trainers.checkpointing import RunCheckpoints

QUIET = "logging.progress_bar=false"


def run_logger(tmp_path, overrides: list[str], steps: int = 4) -> MetricsLogger:
    cfg = load_config(None, [f"trainer.output_dir={tmp_path}"] + overrides)
    logger = MetricsLogger(cfg.run_dir, cfg.logging, steps, cfg.model_dump(mode="json"))
    for step in range(1, steps + 1):
        logger.log(step, {"reward/score_mean": 0.125 * step})
    logger.close()
    return logger


def test_jsonl_false_writes_no_metrics_file(tmp_path):
    run_logger(tmp_path / "on", [QUIET])
    assert len((tmp_path / "on" / "run" / "metrics.jsonl").read_text().splitlines()) == 4
    logger = run_logger(tmp_path / "off", [QUIET, "logging.jsonl=false"])
    assert not (tmp_path / "off" / "run" / "metrics.jsonl").exists()
    assert [row["step"] for row in logger.history] == [1, 2, 3, 4]  # still kept for the summary


def test_log_every_prints_every_nth_step(tmp_path, capsys):
    run_logger(tmp_path / "a", [QUIET, "logging.log_every=2"])
    printed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed == ["step 2", "step 4"]
    run_logger(tmp_path / "b", [QUIET])
    printed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed == ["step 1", "step 2", "step 3", "step 4"]


def test_wandb_without_the_package_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    logger = run_logger(tmp_path, [QUIET, "logging.wandb=true"])
    assert logger.wandb is None and "wandb is not installed" in capsys.readouterr().out


def test_wandb_logs_each_step_to_the_configured_project(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account: the run is written under the run dir
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = run_logger(tmp_path, [QUIET, "logging.wandb=true", "logging.wandb_project=wiring_proj",
                                   "trainer.name=wb_run"], steps=2)
    assert logger.wandb.project == "wiring_proj" and logger.wandb.name == "wb_run"
    wandb.teardown()  # the W&B service writes the run file asynchronously; stopping it flushes the file
    [record] = glob.glob(str(tmp_path / "wb_run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(record).read_bytes()
    assert b"wiring_proj" in data and b"reward/score_mean" in data and b"0.25" in data


# ---- checkpoint.allow_incompatible_resume ---------------------------------------------------------


def test_allow_incompatible_resume_lets_a_changed_run_resume(tmp_path):
    base = [f"trainer.output_dir={tmp_path}", "checkpoint.resume=auto"]
    RunCheckpoints(load_config(None, base), {}).save(3, {"step": 3})
    changed = base + ["trainer.mini_batch_size=4"]
    with pytest.raises(CheckpointError, match="trainer.mini_batch_size"):
        RunCheckpoints(load_config(None, changed), {}).restore()
    state, _ = RunCheckpoints(load_config(None, changed + ["checkpoint.allow_incompatible_resume=true"]), {}).restore()
    assert state == {"step": 3}
