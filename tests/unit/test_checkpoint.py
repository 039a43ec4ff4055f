"""Checkpoint storage (rlhf_ray/checkpoint.py): round trips, manifest, retention, a crash at each
point of a save, corruption fallback, resume rules, compatibility messages. Real files in tmp_path;
crashes are real `os._exit`s in a forked child."""

import hashlib
import json
import logging
import os
import pickle
import random
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from rlhf_ray import checkpoint as ck
from rlhf_ray.checkpoint import CheckpointError, CheckpointStore


def _save(store, step, scale=1.0):
    tmp = store.begin(step)
    ck.save_json(tmp, "trainer", {"step": step, "kl_coef": 0.1 * step})
    ck.save_tensors(tmp, "policy/state", {"w": torch.arange(6.0).reshape(2, 3) * scale * step})
    return store.commit(tmp, step, {"config_hash": "abc", "step_seen": step})


def _names(root):
    return sorted(p.name for p in root.iterdir())


def _steps(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
            torch.rand(4).tolist(), torch.randn(3).tolist())


# --- round trip and manifest ----------------------------------------------------------------


def test_round_trip_json_tensors_and_manifest(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    tmp = store.begin(7)
    assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-step_00000007-")
    state = {"step": 7, "kl_coef": 0.1 + 0.2, "data_pos": [3, 17], "note": None, "nested": {"a": [1.5e-300]}}
    tensors = {"f32": torch.randn(3, 4), "bf16": torch.randn(5).bfloat16(), "i64": torch.arange(4),
               "flag": torch.tensor([True, False]), "strided": torch.randn(4, 3).t()}
    ck.save_json(tmp, "trainer", state)
    ck.save_tensors(tmp, "normaliser/stats", tensors)
    (tmp / "policy" / "ds").mkdir(parents=True)  # what a DeepSpeed rank would write
    (tmp / "policy" / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"\x00\x01" * 1000)
    final = store.commit(tmp, 7, {"config_hash": "abc", "code_version": "0.1.0+g1234"})

    assert final == tmp_path / "step_00000007" and not tmp.exists()
    assert (tmp_path / "latest").read_text() == "step_00000007\n"
    assert _names(tmp_path) == ["latest", "step_00000007"]
    assert ck.load_json(final, "trainer") == state
    loaded = ck.load_tensors(final, "normaliser/stats.safetensors")  # the suffix is optional
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t)

    m = ck.read_manifest(final)
    assert m["format"] == ck.FORMAT and m["format_version"] == ck.FORMAT_VERSION and m["step"] == 7
    assert m["metadata"] == {"config_hash": "abc", "code_version": "0.1.0+g1234"}
    assert datetime.fromisoformat(m["created_at"]).tzinfo is not None
    paths = [e["path"] for e in m["files"]]
    assert paths == sorted(["trainer.json", "normaliser/stats.safetensors", "policy/ds/mp_rank_00_model_states.pt"])
    for e in m["files"]:
        data = (final / e["path"]).read_bytes()
        assert e["size"] == len(data) and e["sha256"] == hashlib.sha256(data).hexdigest()
    assert ck.verify(final) == []


def test_rng_round_trip_is_exact(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()  # leaves cached Gaussians behind in random and numpy: they must be restored too
    state = ck.capture_rng()
    assert state["python"][2] is not None and state["numpy"][3] == 1
    store = CheckpointStore(tmp_path, keep_last=1)
    tmp = store.begin(1)
    ck.save_rng(tmp, "rng/driver", state)
    ckpt = store.commit(tmp, 1)
    expected = [_draws() for _ in range(3)]

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    ck.restore_rng(ck.load_rng(ckpt, "rng/driver"))
    assert [_draws() for _ in range(3)] == expected
    saved = json.loads((ckpt / "rng" / "driver.json").read_text())
    assert set(saved) == {"python", "numpy", "cuda_devices"}  # the torch state went to safetensors


def test_writer_mistakes_are_refused(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    tmp = store.begin(1)
    ck.save_json(tmp, "trainer", {})
    with pytest.raises(CheckpointError, match="already written"):
        ck.save_json(tmp, "trainer.json", {})
    with pytest.raises(CheckpointError, match="plain relative"):
        ck.save_json(tmp, "../escape", {})
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        ck.save_json(tmp, "bad", {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="str → Tensor"):
        ck.save_tensors(tmp, "t", {"x": [1.0]})
    with pytest.raises(CheckpointError, match="not a directory made by begin"):
        store.commit(tmp, 2)
    os.symlink("/etc/hostname", tmp / "link")
    with pytest.raises(CheckpointError, match="symbolic links are not allowed"):
        store.commit(tmp, 1)
    os.unlink(tmp / "link")
    (tmp / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="reserved"):
        store.commit(tmp, 1)


# --- retention ------------------------------------------------------------------------------


def test_retention_keeps_newest_and_is_rebuilt_from_disk(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in range(1, 6):
        _save(store, step)
    assert _steps(tmp_path) == ["step_00000004", "step_00000005"]

    store3 = CheckpointStore(tmp_path, keep_last=3)  # a fresh object knows only what is on disk
    _save(store3, 6)
    _save(store3, 7)
    assert _steps(tmp_path) == ["step_00000005", "step_00000006", "step_00000007"]
    _save(CheckpointStore(tmp_path, keep_last=1), 8)
    assert _steps(tmp_path) == ["step_00000008"]
    assert CheckpointStore(tmp_path, keep_last=1).latest_valid() == tmp_path / "step_00000008"


# --- a crash at each point of a save ---------------------------------------------------------


def _commit_in_crashing_child(store, tmp, step, point):
    """Run commit in a child interpreter with the fault set; return the child's exit code. A fresh
    interpreter, not a fork: a forked pytest can block on a lock another test's thread held."""
    state = Path(tempfile.mkdtemp())
    (state / "commit.pkl").write_bytes(pickle.dumps((store, tmp, step)))
    env = dict(os.environ, RLHF_RAY_FAULTS=f"crash@rollout.generate#9, crash@checkpoint.{point}",
               RLHF_RAY_FAULTS_DIR=str(state / "faults"))  # a fresh run: the fault fires
    code = ("import pickle, sys; store, tmp, step = pickle.load(open(sys.argv[1], 'rb')); "
            "store.commit(tmp, step, {'step_seen': step})")
    return subprocess.run([sys.executable, "-c", code, str(state / "commit.pkl")], env=env, timeout=300).returncode


# point → which checkpoint resume must find afterwards, and whether the new step_2 exists
CRASH_OUTCOMES = {
    "after_files": ("step_00000001", False),
    "after_manifest": ("step_00000001", False),
    "after_rename": ("step_00000001", True),  # complete but not yet named by `latest`: ignored
    "after_latest": ("step_00000002", True),
    "during_retention": ("step_00000002", True),
}


@pytest.mark.parametrize("point", list(CRASH_OUTCOMES))
def test_crash_at_each_commit_point_leaves_a_complete_checkpoint(tmp_path, point, caplog):
    store = CheckpointStore(tmp_path, keep_last=1)
    _save(store, 1)
    tmp = store.begin(2)
    ck.save_json(tmp, "trainer", {"step": 2})
    ck.save_tensors(tmp, "policy/state", {"w": torch.ones(3)})
    assert _commit_in_crashing_child(store, tmp, 2, point) == ck.FAULT_EXIT_CODE

    with caplog.at_level(logging.INFO, logger="rlhf_ray.checkpoint"):
        reopened = CheckpointStore(tmp_path, keep_last=1)
        found = reopened.resolve("auto")
    expected, step2_exists = CRASH_OUTCOMES[point]
    assert found == tmp_path / expected and ck.verify(found) == []
    assert ck.read_manifest(found)["step"] == int(expected[-1])
    assert not [n for n in _names(tmp_path) if n.startswith(".")], "temporary entries were not cleaned"
    assert (tmp_path / "step_00000002").exists() == step2_exists
    if step2_exists:
        assert ck.verify(tmp_path / "step_00000002") == []  # no half-written step_* ever
    if point in ("after_files", "after_manifest", "during_retention"):
        assert "removed stale" in caplog.text

    # the resumed run saves again: retention ends with exactly the newest checkpoint
    _save(reopened, 3)
    assert _steps(tmp_path) == ["step_00000003"]


def test_crash_while_replacing_an_existing_step_restores_it(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    _save(store, 1)
    tmp = store.begin(2)
    ck.save_json(tmp, "trainer", {"attempt": 1})
    assert _commit_in_crashing_child(store, tmp, 2, "after_rename") == ck.FAULT_EXIT_CODE
    old_step2 = ck.read_manifest(tmp_path / "step_00000002")

    store = CheckpointStore(tmp_path, keep_last=1)  # resumes from step 1, reaches step 2 again
    tmp = store.begin(2)
    ck.save_json(tmp, "trainer", {"attempt": 2})
    assert _commit_in_crashing_child(store, tmp, 2, "after_move_aside") == ck.FAULT_EXIT_CODE
    assert not (tmp_path / "step_00000002").exists()  # moved aside, the new one not yet in place

    store = CheckpointStore(tmp_path, keep_last=1)  # startup puts the old step_2 back
    assert ck.read_manifest(tmp_path / "step_00000002") == old_step2
    assert store.latest_valid() == tmp_path / "step_00000001"
    tmp = store.begin(2)
    ck.save_json(tmp, "trainer", {"attempt": 3})
    store.commit(tmp, 2)
    assert _names(tmp_path) == ["latest", "step_00000002"]
    assert ck.load_json(store.latest_valid(), "trainer") == {"attempt": 3}


def test_checkpoint_fault_points_are_checked(monkeypatch):
    monkeypatch.delenv("RLHF_RAY_FAULTS", raising=False)
    for point in ck.FAULT_POINTS:
        ck._fault(point)  # no fault configured: a no-op
    with pytest.raises(ValueError, match="unknown checkpoint fault point"):
        ck._fault("before_everything")


def test_stale_tmp_dirs_are_removed_on_open(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=1)
    _save(store, 1)
    abandoned = store.begin(2)
    ck.save_json(abandoned, "trainer", {})
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        CheckpointStore(tmp_path, keep_last=1)
    assert not abandoned.exists() and abandoned.name in caplog.text
    assert _names(tmp_path) == ["latest", "step_00000001"]


# --- corruption and fallback -----------------------------------------------------------------


def test_truncated_and_bit_flipped_files_fall_back(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        _save(store, step)
    state3 = tmp_path / "step_00000003" / "policy" / "state.safetensors"
    state3.write_bytes(state3.read_bytes()[:-7])
    assert ck.verify(tmp_path / "step_00000003") == [
        f"policy/state.safetensors: size {state3.stat().st_size} bytes, manifest says "
        f"{state3.stat().st_size + 7} (truncated or overwritten)"]

    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        assert store.latest_valid() == tmp_path / "step_00000002"
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "step_00000003" in skipped[0] and "truncated" in skipped[0]
    assert "\n" not in skipped[0]

    trainer2 = tmp_path / "step_00000002" / "trainer.json"
    data = bytearray(trainer2.read_bytes())
    data[3] ^= 0x01  # same size, one bit different
    trainer2.write_bytes(bytes(data))
    assert ck.verify(tmp_path / "step_00000002") == ["trainer.json: sha256 differs from the manifest (corrupted)"]
    assert store.latest_valid() == tmp_path / "step_00000001"
    assert ck.load_json(store.resolve("auto"), "trainer")["step"] == 1

    (tmp_path / "step_00000001" / "manifest.json").unlink()
    assert store.latest_valid() is None
    with pytest.raises(CheckpointError) as err:
        store.resolve("auto")
    msg = str(err.value)
    assert str(tmp_path) in msg
    for expected in ("step_00000003: policy/state.safetensors: size", "step_00000002: trainer.json: sha256",
                     "step_00000001: manifest.json missing"):
        assert expected in msg


def test_verify_missing_file_extra_file_and_bad_manifest(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=1)
    ckpt = _save(store, 1)
    (ckpt / "notes.txt").write_text("a stray file")
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        assert ck.verify(ckpt) == []  # extra files are tolerated ...
    assert "notes.txt" in caplog.text  # ... and logged
    (ckpt / "trainer.json").unlink()
    assert ck.verify(ckpt) == ["trainer.json: missing"]
    (ckpt / "manifest.json").write_text("{not json")
    assert ck.verify(ckpt)[0].startswith("manifest.json unreadable")
    manifest = {"format": ck.FORMAT, "format_version": 99, "step": 1, "metadata": {}, "files": []}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert "format_version 99" in ck.verify(ckpt)[0]
    manifest.update(format_version=1, files=[{"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64}])
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert "not a plain relative path" in ck.verify(ckpt)[0]
    manifest.update(step=5, files=[])
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert ck.verify(ckpt) == ["manifest step 5 does not match the directory name"]


def test_latest_pointer_missing_corrupt_or_dangling(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        _save(store, step)
    (tmp_path / "latest").write_text("garbage\x00")
    assert store.latest_valid() == tmp_path / "step_00000003"
    (tmp_path / "latest").unlink()
    assert store.latest_valid() == tmp_path / "step_00000003"
    (tmp_path / "latest").write_text("step_00000009\n")  # names a directory that is gone
    assert store.latest_valid() == tmp_path / "step_00000003"
    (tmp_path / "latest").write_text("step_00000002\n")  # step_3 is newer than the pointer: ignored
    assert store.latest_valid() == tmp_path / "step_00000002"


# --- resolve and compatibility ---------------------------------------------------------------


def test_resolve_rules(tmp_path):
    store = CheckpointStore(tmp_path / "ckpt", keep_last=2)
    assert store.resolve("auto") is None  # no checkpoint at all: a fresh start
    assert store.resolve("off") is None
    with pytest.raises(CheckpointError, match="does not exist"):
        store.resolve(str(tmp_path / "nowhere"))
    with pytest.raises(CheckpointError, match="manifest.json missing"):
        store.resolve(tmp_path / "ckpt")  # an empty directory is not a checkpoint

    first, second = _save(store, 1), _save(store, 2)
    assert store.resolve("auto") == second
    assert store.resolve(str(first)) == first
    assert store.resolve("off") is None
    with pytest.raises(CheckpointError, match="checkpoint root"):
        store.resolve(tmp_path / "ckpt")
    (first / "trainer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"trainer.json: size"):
        store.resolve(first)  # an explicit checkpoint that fails never falls back

    (tmp_path / "ckpt" / "latest").write_text("step_00000005\n")  # only the pointer is left
    for d in (first, second):
        (d / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        store.resolve("auto")


def test_check_compatible_messages(caplog):
    saved = {"policy_world_size": 4, "model": "Qwen/Qwen2.5-1.5B", "dataset": "gsm8k", "shape": [2, 3]}
    current = {"policy_world_size": 2, "model": "Qwen/Qwen2.5-1.5B", "dataset": "math", "shape": (2, 3),
               "stage": "ppo"}
    with pytest.raises(CheckpointError) as err:
        ck.check_compatible(saved, current, allow=False)
    msg = str(err.value)
    assert "3 field(s)" in msg
    assert "policy_world_size: checkpoint 4, this run 2" in msg
    assert "dataset: checkpoint 'gsm8k', this run 'math'" in msg
    assert "stage: checkpoint (absent), this run 'ppo'" in msg
    assert "model:" not in msg and "shape:" not in msg  # equal fields (a tuple equals its JSON list)
    assert ck.ALLOW_OVERRIDE in msg

    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        ck.check_compatible(saved, current, allow=True, override="resume_allow_mismatch=true")
    assert "policy_world_size" in caplog.text and "resume_allow_mismatch=true" in caplog.text
    ck.check_compatible(saved, {"model": "Qwen/Qwen2.5-1.5B"}, allow=False)
