"""A full disk at a checkpoint (issue: storage faults): real Ray actors, real DeepSpeed, a toy GRPO run
whose checkpoint.dir is a tmpfs with room for one checkpoint and a half. The second save fails in the
policy rank's DeepSpeed save_checkpoint; the run stops with one line naming the phase, the path and
the cause, without a restart; the first checkpoint verifies, and a run resumed from a copy of the
directory continues from it. Needs root (mount -t tmpfs): fails, not skips, without it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from rlhf_ray import checkpoint as ck
from rlhf_ray.config import load_config
from rlhf_ray.placement import PhaseError
from rlhf_ray.trainers.ppo import run_ppo
from tests.integration.helpers import toy_overrides

pytestmark = pytest.mark.integration
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CHECKPOINT_BYTES = 1_241_088  # one checkpoint of the run below, in 4 KiB pages (measured: the policy's
# DeepSpeed state is 1.17 MB of it). The tmpfs holds 1.5 of them: the first save fits, the second does not.


def _cfg(tmp_path, *extra: str):
    return load_config(CONFIGS / "toy_grpo.yaml", toy_overrides(
        tmp_path, "trainer.total_steps=2", "trainer.prompts_per_step=4", "trainer.mini_batch_size=16",
        "trainer.micro_batch_size=16", "trainer.eval_prompts=8", "checkpoint.export_hf=false", "checkpoint.every=1",
        "checkpoint.keep_last=1", *extra))


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"this test needs root and permission to mount a tmpfs ({' '.join(cmd)}: {done.stderr.strip()})")


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    _run(["mount", "-t", "tmpfs", "-o", f"size={CHECKPOINT_BYTES * 3 // 2}", "tmpfs", str(mnt)])
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_disk_full_at_a_checkpoint_stops_the_run_and_the_previous_checkpoint_resumes(
        ray_session, tmp_path, small_disk, capsys):
    root = small_disk / "ckpt"
    with pytest.raises(PhaseError) as err:
        run_ppo(_cfg(tmp_path / "full", f"checkpoint.dir={root}", "trainer.max_restarts=1"))
    failure = err.value
    assert (failure.phase, failure.role, failure.step, failure.restartable) == ("checkpoint", "policy", 2, False), (
        f"{failure}\n(if the first save did not fit, measure one checkpoint again and update CHECKPOINT_BYTES)")
    assert f"cause=StorageError: cannot write checkpoint {root}/.tmp-step_00000002-" in str(failure)
    assert "/policy: No space left on device (ENOSPC" in failure.cause
    assert failure.cause.endswith(f"; {root}/latest names step_00000001") and "\n" not in str(failure)
    assert "restarting" not in capsys.readouterr().out  # a restart would hit the same full disk

    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # step 2's tmp dir deleted
    assert ck.verify(root / "step_00000001") == []

    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    cfg = _cfg(tmp_path / "resumed", f"checkpoint.dir={moved}", "checkpoint.resume=auto")
    run_ppo(cfg)
    assert f"resumed from {moved / 'step_00000001'}" in capsys.readouterr().out
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]  # continued after step 1, not from scratch
    assert (moved / "latest").read_text() == "step_00000002\n" and ck.verify(moved / "step_00000002") == []
