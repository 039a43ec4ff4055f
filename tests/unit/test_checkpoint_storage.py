"""Storage faults during checkpoint saves (rlhf_ray/checkpoint.py): a full disk, a read-only mount
and the file-size limit, each hitting a real write — a writer's, the manifest's, `latest`'s,
retention's. After each: the error names the path, the errno and the fix; `latest` still names the
previous checkpoint, which verifies and loads; the failed save's tmp dir is gone (or, read-only,
removed by the next store). Real tmpfs mounts (root needed: a test fails, not skips, without it);
the RLIMIT_FSIZE tests need no privilege and cover the same paths everywhere."""

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_ray import checkpoint as ck
from rlhf_ray.checkpoint import CheckpointStore, StorageError

PAGE = 4096  # tmpfs allocates whole pages


def _save(store, step, numel=3):
    tmp = store.begin(step)
    ck.save_json(tmp, "trainer", {"step": step})
    ck.save_tensors(tmp, "policy/state", {"w": torch.full((numel,), float(step))})
    return store.commit(tmp, step, {"step_seen": step})


def _assert_first_in_force(root):
    """`latest` names step 1, which verifies and loads, and nothing temporary is left."""
    assert (root / "latest").read_text() == "step_00000001\n"
    first = root / "step_00000001"
    assert ck.verify(first) == []
    assert ck.load_json(first, "trainer") == {"step": 1}
    assert torch.equal(ck.load_tensors(first, "policy/state")["w"], torch.ones(3))
    assert CheckpointStore(root, keep_last=1).resolve("auto") == first
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]


def _mount(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        pytest.fail(f"this test needs root and permission to mount a tmpfs ({' '.join(cmd)}: {done.stderr.strip()}); "
                    "run it as root, e.g. in the project's container (the RLIMIT_FSIZE tests need no privilege)")


@pytest.fixture
def tiny_fs(tmp_path):
    """A 64 KiB tmpfs (16 pages) mounted at tmp_path/fs, unmounted at teardown."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    _mount(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)])
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def _read_only(mnt):
    _mount(["mount", "-o", "remount,ro", str(mnt)])


def _read_write(mnt):
    _mount(["mount", "-o", "remount,rw", str(mnt)])


def _fill(mnt, leave_pages):
    """Fill the tmpfs with a file outside the checkpoint root, leaving exactly `leave_pages` pages free."""
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(PAGE))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    os.truncate(mnt / "filler", os.path.getsize(mnt / "filler") - leave_pages * PAGE)


# --- a full disk -------------------------------------------------------------------------------


def _write_json(tmp):
    ck.save_json(tmp, "driver", {"big": list(range(30_000))})
    return tmp / "driver.json"


def _write_tensors(tmp):
    ck.save_tensors(tmp, "policy/state", {"w": torch.zeros(30_000)})
    return tmp / "policy" / "state.safetensors"


def _write_like_deepspeed(tmp):
    """torch.save's zip writer, as a DeepSpeed rank's save_checkpoint writes: its error has no errno."""
    with ck.storage_errors(tmp / "policy"):
        (tmp / "policy").mkdir()
        torch.save({"w": torch.zeros(30_000)}, tmp / "policy" / "mp_rank_00_model_states.pt")
    return tmp / "policy"


@pytest.mark.parametrize("write", [_write_json, _write_tensors, _write_like_deepspeed])
def test_disk_full_in_a_writer_keeps_the_previous_checkpoint(tiny_fs, write):
    root = tiny_fs / "ckpt"
    store = CheckpointStore(root, keep_last=1)
    _save(store, 1)
    tmp = store.begin(2)
    ck.save_json(tmp, "trainer", {"step": 2})
    with pytest.raises(StorageError) as err:
        write(tmp)
    failed = {_write_json: tmp / "driver.json", _write_tensors: tmp / "policy" / "state.safetensors",
              _write_like_deepspeed: tmp / "policy"}[write]
    assert err.value.errno == errno.ENOSPC and err.value.path == str(failed)
    assert str(err.value).startswith(f"cannot write checkpoint {failed}: No space left on device (ENOSPC")
    assert "free space there" in str(err.value) and "checkpoint.dir" in str(err.value)
    assert "\n" not in str(err.value)
    store.abort(tmp)  # as the run's save does: the space comes back
    _assert_first_in_force(root)
    _save(store, 2)  # a save that fits now succeeds, and retention keeps only it
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]


def test_disk_full_at_the_manifest_leaves_latest_on_the_previous(tiny_fs):
    root = tiny_fs / "ckpt"
    store = CheckpointStore(root, keep_last=1)
    _save(store, 1)
    tmp = store.begin(2)
    ck.save_json(tmp, "trainer", {"step": 2})
    _fill(tiny_fs, leave_pages=0)
    with pytest.raises(StorageError, match=r"manifest\.json: No space left on device \(ENOSPC\)") as err:
        store.commit(tmp, 2)
    assert err.value.path == str(tmp / "manifest.json")
    store.abort(tmp)
    _assert_first_in_force(root)


def test_disk_full_at_latest_undoes_the_new_checkpoint(tiny_fs):
    """The manifest takes the last free page, so step_2 is complete and renamed in when `latest`'s
    write fails: step_2 is deleted again (it would hold the space the next save needs)."""
    root = tiny_fs / "ckpt"
    store = CheckpointStore(root, keep_last=1)
    _save(store, 1)
    tmp = store.begin(2)
    ck.save_json(tmp, "trainer", {"step": 2})
    _fill(tiny_fs, leave_pages=1)
    with pytest.raises(StorageError) as err:
        store.commit(tmp, 2)
    assert str(err.value).startswith(f"cannot write checkpoint {root / 'latest'}: No space left on device (ENOSPC)")
    assert not tmp.exists()
    _assert_first_in_force(root)


# --- a read-only mount -------------------------------------------------------------------------


def test_read_only_between_saves_fails_at_begin_naming_the_path(tiny_fs):
    root = tiny_fs / "ckpt"
    store = CheckpointStore(root, keep_last=1)
    _save(store, 1)
    _read_only(tiny_fs)
    with pytest.raises(StorageError) as err:
        store.begin(2)
    assert err.value.errno == errno.EROFS
    assert f"cannot write checkpoint {root}/.tmp-step_00000002-" in str(err.value)
    assert "Read-only file system (EROFS): remount that filesystem read-write or point checkpoint.dir" in str(err.value)
    _assert_first_in_force(root)


def test_read_only_mid_save_then_the_next_store_cleans_up(tiny_fs, caplog):
    root = tiny_fs / "ckpt"
    store = CheckpointStore(root, keep_last=1)
    _save(store, 1)
    tmp = store.begin(2)
    ck.save_json(tmp, "trainer", {"step": 2})  # one writer done ...
    _read_only(tiny_fs)
    with pytest.raises(StorageError, match="Read-only file system") as err:  # ... the next one refused
        ck.save_tensors(tmp, "policy/state", {"w": torch.ones(3)})
    assert err.value.path == str(tmp / "policy")  # its subdirectory could not be made
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        store.abort(tmp)  # cannot delete on a read-only mount: logged, left for the next store
    assert tmp.exists() and f"could not delete {tmp}" in caplog.text
    assert (root / "latest").read_text() == "step_00000001\n" and ck.verify(root / "step_00000001") == []
    with pytest.raises(StorageError, match=f"cannot clean up {tmp}: Read-only file system"):
        CheckpointStore(root, keep_last=1)  # still read-only: the next run's store says so
    _read_write(tiny_fs)
    _assert_first_in_force(root)  # opens a store, which removes the stale tmp dir


def test_read_only_at_retention_keeps_both_checkpoints(tiny_fs, monkeypatch):
    """The mount turns read-only just after `latest` moved (the remount is timed by running it before
    the real retention): the new checkpoint is in force, the old one intact."""
    root = tiny_fs / "ckpt"
    store = CheckpointStore(root, keep_last=1)
    _save(store, 1)
    retention = CheckpointStore._apply_retention
    monkeypatch.setattr(CheckpointStore, "_apply_retention",
                        lambda self, step: (_read_only(tiny_fs), retention(self, step)))
    with pytest.raises(StorageError) as err:
        _save(store, 2)
    assert str(err.value).startswith(f"cannot delete the old checkpoint {root / 'step_00000001'}: "
                                     "Read-only file system (EROFS)")
    assert (root / "latest").read_text() == "step_00000002\n"
    assert ck.verify(root / "step_00000002") == [] and ck.verify(root / "step_00000001") == []
    monkeypatch.undo()
    _read_write(tiny_fs)
    _save(CheckpointStore(root, keep_last=1), 3)  # retention catches up at the next commit
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003"]


# --- the run's saves: one line naming the phase, the path and the cause ---------------------------


def _run_checkpoints(root):
    """A run's checkpoints with no trained pools: the driver's own writes, no Ray actors."""
    from rlhf_ray.config import load_config
    from rlhf_ray.trainers.checkpointing import RunCheckpoints

    configs = Path(__file__).resolve().parents[2] / "configs"
    cfg = load_config(configs / "toy_grpo.yaml", [f"checkpoint.dir={root}", "checkpoint.keep_last=1"])
    return RunCheckpoints(cfg, {})


def test_a_run_save_on_a_full_disk_fails_the_checkpoint_phase(tiny_fs):
    from rlhf_ray.placement import PhaseError

    root = tiny_fs / "ckpt"
    checkpoints = _run_checkpoints(root)
    checkpoints.save(1, {"step": 1})
    with pytest.raises(PhaseError) as err:
        checkpoints.save(2, {"step": 2}, {"queue": torch.zeros(30_000)})
    failure = err.value
    assert (failure.phase, failure.role, failure.step, failure.restartable) == ("checkpoint", "driver", 2, False)
    assert str(failure).startswith(f"FAILED phase=checkpoint role=driver step=2 cause=StorageError: "
                                   f"cannot write checkpoint {root}/.tmp-step_00000002-")
    assert "No space left on device (ENOSPC)" in failure.cause
    assert failure.cause.endswith(f"; {root}/latest names step_00000001") and "\n" not in str(failure)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # the tmp dir was deleted
    assert ck.verify(root / "step_00000001") == [] and ck.load_json(root / "step_00000001", "driver") == {"step": 1}


def test_any_error_of_the_drivers_save_fails_the_checkpoint_phase_naming_the_step(tmp_path, monkeypatch):
    """Not only storage faults: whatever the driver's part of a save raises ends the run with the
    phase's one line and the checkpoint still in force (seen in the chaos run: a bare
    `FAILED InjectedFault: ...` without phase, role or step)."""
    from rlhf_ray.placement import PhaseError

    monkeypatch.setenv("RLHF_RAY_FAULTS", "raise@checkpoint.after_files#2")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))
    root = tmp_path / "ckpt"
    checkpoints = _run_checkpoints(root)
    checkpoints.save(1, {"step": 1})
    with pytest.raises(PhaseError) as err:
        checkpoints.save(2, {"step": 2})
    assert str(err.value) == ("FAILED phase=checkpoint role=driver step=2 cause=InjectedFault: injected fault "
                              f"raise@checkpoint.after_files#2; {root}/latest names step_00000001")
    assert not err.value.restartable
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]  # the tmp dir was deleted


def test_a_run_on_a_read_only_checkpoint_dir_fails_at_start(tiny_fs):
    from rlhf_ray.placement import PhaseError

    root = tiny_fs / "ckpt"
    _run_checkpoints(root).save(1, {"step": 1})
    (root / ".tmp-step_00000002-0badf00d").mkdir()  # left by a save the storage refused
    _read_only(tiny_fs)
    with pytest.raises(PhaseError) as err:
        _run_checkpoints(root)
    assert str(err.value) == (
        f"FAILED phase=checkpoint role=driver step=init cause=StorageError: cannot clean up "
        f"{root}/.tmp-step_00000002-0badf00d: Read-only file system (EROFS): remount that filesystem read-write "
        "or point checkpoint.dir at other storage")
    assert not err.value.restartable


# --- the file-size limit (no privilege needed) ---------------------------------------------------


# A fresh interpreter, not a fork: pytest's process holds other tests' threads (a Serve router, an
# executor), and a forked child can block forever on a lock one of them held.
FSIZE_CHILD = """
import json, resource, signal, sys
import torch
from rlhf_ray import checkpoint as ck
from rlhf_ray.checkpoint import CheckpointStore, StorageError

root, limit, out, at = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
store = CheckpointStore(root, keep_last=1)
tmp = store.begin(2)
ck.save_json(tmp, "trainer", {"step": 2})
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))  # the soft limit: no privilege needed
try:
    if at == "writer":
        ck.save_tensors(tmp, "policy/state", {"w": torch.zeros(100_000)})  # 400 kB
    else:
        store.commit(tmp, 2)
except StorageError as e:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    seen = {"tmp": str(tmp), "errno": e.errno, "path": e.path, "message": str(e)}
    open(out, "w").write(json.dumps(seen))
finally:
    store.abort(tmp)
"""


def _second_save_under_fsize_limit(root, limit, at, tmp_path):
    """Step 2's save in a child process under RLIMIT_FSIZE=limit, failing `at` the writer or the
    manifest; returns what the StorageError said (and the save's tmp dir)."""
    out = tmp_path / "seen.json"
    done = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(root), str(limit), str(out), at],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and out.exists(), f"the child raised no StorageError: {done.stderr[-2000:]}"
    return json.loads(out.read_text())


def test_file_size_limit_in_a_writer_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    _save(CheckpointStore(root, keep_last=1), 1)
    seen = _second_save_under_fsize_limit(root, 64 << 10, "writer", tmp_path)
    written = Path(seen["tmp"]) / "policy" / "state.safetensors"
    assert seen["errno"] == errno.EFBIG and seen["path"] == str(written)
    assert seen["message"].startswith(f"cannot write checkpoint {written}: "
                                      "File too large (EFBIG): raise the file-size limit (ulimit -f)")
    _assert_first_in_force(root)


def test_file_size_limit_at_the_manifest_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    _save(CheckpointStore(root, keep_last=1), 1)
    seen = _second_save_under_fsize_limit(root, 0, "manifest", tmp_path)
    assert seen["errno"] == errno.EFBIG and seen["path"] == str(Path(seen["tmp"]) / "manifest.json")
    _assert_first_in_force(root)


def test_storage_error_survives_pickling_with_its_message():
    """A rank's StorageError reaches the driver through Ray's pickling: the same one line."""
    import pickle

    err = StorageError("/ckpt/.tmp-step_00000002-00000000/policy", errno.ENOSPC, "No space left on device (ENOSPC)")
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), str(back), back.path, back.errno) == (StorageError, str(err), err.path, errno.ENOSPC)


def test_errors_that_are_not_storage_faults_pass_through(tmp_path):
    with pytest.raises(ValueError, match="not storage"), ck.storage_errors(tmp_path):
        raise ValueError("not storage")
    with pytest.raises(RuntimeError, match="unexpected pos"), ck.storage_errors(tmp_path):
        raise RuntimeError("unexpected pos 1 vs 0")  # an errno-less writer error on healthy storage
    assert list(tmp_path.iterdir()) == []  # the test write beside it was removed
