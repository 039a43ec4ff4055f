"""Checkpoint protocol details (rlhf_ray/checkpoint.py) the round-trip tests leave open: argument
checks and their messages, the manifest's exact form, each malformed-manifest and bad-file verdict,
startup recovery of moved-aside and temporary entries, retention with incomplete and newer
checkpoints, the reasons resume=auto lists, CUDA RNG states (faked), and the filesystem helpers."""

import errno
import hashlib
import json
import logging
import os
import random
import re

import numpy as np
import pytest
import torch

from rlhf_ray import checkpoint as ck
from rlhf_ray.checkpoint import CheckpointError, CheckpointStore


def _save(store, step, **files):
    tmp = store.begin(step)
    ck.save_json(tmp, "trainer", {"step": step})
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    return store.commit(tmp, step)


def _names(root):
    return sorted(p.name for p in root.iterdir())


def _messages(caplog):
    return [r.getMessage() for r in caplog.records]


def _write_manifest(ckpt, **changes):
    manifest = {"format": ck.FORMAT, "format_version": 1, "step": 1, "metadata": {}, "files": []}
    manifest.update(changes)
    (ckpt / "manifest.json").write_text(json.dumps(manifest))


def _raise_at(monkeypatch, tmp_path, point):
    """A `raise` fault at a commit point: commit stops there, leaving what a crash would."""
    monkeypatch.setenv("RLHF_RAY_FAULTS", f"raise@checkpoint.{point}")
    monkeypatch.setenv("RLHF_RAY_FAULTS_DIR", str(tmp_path / "faults"))


# --- arguments -------------------------------------------------------------------------------------


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(ValueError) as err:
        CheckpointStore(tmp_path, keep_last=0)
    assert str(err.value) == "keep_last must be >= 1, got 0"
    store = CheckpointStore(tmp_path / "a" / "b", keep_last=1)  # parents are created
    assert store.root == tmp_path / "a" / "b" and store.root.is_dir() and store.keep_last == 1


@pytest.mark.parametrize("step", [-1, True, 1.0, "3", None])
def test_steps_are_non_negative_ints(tmp_path, step):
    store = CheckpointStore(tmp_path, keep_last=1)
    with pytest.raises(ValueError) as err:
        store.begin(step)
    assert str(err.value) == f"step must be an int >= 0, got {step!r}"
    tmp = store.begin(0)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        store.commit(tmp, step)


def test_step_zero_and_wide_steps(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    tmp = store.begin(0)
    assert re.fullmatch(r"\.tmp-step_00000000-[0-9a-f]{8}", tmp.name)
    assert store.commit(tmp, 0) == tmp_path / "step_00000000"
    big = _save(store, 123456789)
    assert big.name == "step_123456789" and store.latest_valid() == big
    assert ck.step_dir_name(5) == "step_00000005"
    assert [ck._step_of(n) for n in ("step_00000005", "step_123456789", "step_5", "step_000000005",
                                     "xstep_00000005", "step_00000005x")] == [5, 123456789, None, None, None, None]


def test_commit_refuses_a_dir_not_from_begin_of_this_step_and_store(tmp_path):
    store = CheckpointStore(tmp_path / "root", keep_last=1)
    other = CheckpointStore(tmp_path / "other", keep_last=1)
    for tmp, step in ((store.begin(2), 3), (other.begin(2), 2), (store.root / "step_00000002", 2),
                      (store.begin(12), 1)):
        with pytest.raises(CheckpointError) as err:
            store.commit(tmp, step)
        assert str(err.value) == f"{tmp} is not a directory made by begin({step}) of the store at {store.root}"
    plain = store.root / ".tmp-step_00000004-file"
    plain.write_text("")
    with pytest.raises(CheckpointError, match="not a directory made by begin"):
        store.commit(plain, 4)


def test_commit_metadata_must_be_json(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    tmp = store.begin(1)
    with pytest.raises(CheckpointError) as err:
        store.commit(tmp, 1, {"x": {1, 2}})
    assert str(err.value).startswith("checkpoint metadata is not JSON-serialisable: ")
    assert "set" in str(err.value) and isinstance(err.value.__cause__, TypeError)
    with pytest.raises(CheckpointError, match="not JSON-serialisable"):
        store.commit(tmp, 1, {"y": object()})
    ckpt = store.commit(tmp, 1, {"shape": (2, 3), "nested": {"k": None}})
    assert ck.read_manifest(ckpt)["metadata"] == {"shape": [2, 3], "nested": {"k": None}}


# --- the manifest and the pointer ----------------------------------------------------------------


def test_manifest_and_latest_are_written_exactly(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    tmp = store.begin(3)
    (tmp / "empty.bin").write_bytes(b"")
    (tmp / "a" / "b").mkdir(parents=True)
    big = os.urandom((1 << 20) * 2 + 123)  # more than two read chunks
    (tmp / "a" / "b" / "big.bin").write_bytes(big)
    ckpt = store.commit(tmp, 3, {"k": 1})
    text = (ckpt / "manifest.json").read_text()
    manifest = json.loads(text)
    assert text == json.dumps(manifest, indent=2) + "\n"
    assert list(manifest) == ["format", "format_version", "step", "created_at", "metadata", "files"]
    assert (manifest["format"], manifest["format_version"], manifest["step"], manifest["metadata"]) == (
        "rlhf_ray.checkpoint", 1, 3, {"k": 1})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", manifest["created_at"])
    assert manifest["files"] == [
        {"path": "a/b/big.bin", "size": len(big), "sha256": hashlib.sha256(big).hexdigest()},
        {"path": "empty.bin", "size": 0, "sha256": hashlib.sha256(b"").hexdigest()},
    ]
    assert ck._hash_file(ckpt / "a" / "b" / "big.bin") == (len(big), hashlib.sha256(big).hexdigest())
    assert (tmp_path / "latest").read_bytes() == b"step_00000003\n"
    assert _names(tmp_path) == ["latest", "step_00000003"]  # no pointer tmp file left behind
    assert ck.read_manifest(ckpt) == manifest


def test_many_files_are_hashed_in_order(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    tmp = store.begin(1)
    contents = {f"f{i:02d}.bin": bytes([i]) * (i + 1) for i in range(20)}
    for name, data in contents.items():
        (tmp / name).write_bytes(data)
    files = ck.read_manifest(store.commit(tmp, 1))["files"]
    assert files == [{"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                     for n, d in sorted(contents.items())]
    assert ck._map_threads(lambda x: x * x, range(10)) == [x * x for x in range(10)]
    assert ck._map_threads(str, [7]) == ["7"] and ck._map_threads(str, []) == []


def test_commit_refuses_symlinked_dirs_and_special_files(tmp_path):
    store = CheckpointStore(tmp_path / "root", keep_last=1)
    tmp = store.begin(1)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp / "linked_dir")
    with pytest.raises(CheckpointError) as err:
        store.commit(tmp, 1)
    assert str(err.value) == (f"{tmp / 'linked_dir'}: a checkpoint must be self-contained; "
                              "symbolic links are not allowed")
    os.unlink(tmp / "linked_dir")
    os.mkfifo(tmp / "pipe")
    with pytest.raises(CheckpointError) as err:
        store.commit(tmp, 1)
    assert str(err.value) == f"{tmp / 'pipe'}: not a regular file"
    os.unlink(tmp / "pipe")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "manifest.json").write_text("{}")  # reserved only at the top
    assert [e["path"] for e in ck.read_manifest(store.commit(tmp, 1))["files"]] == ["sub/manifest.json"]


def test_commit_replaces_an_existing_step(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=2)
    _save(store, 1)
    first = _save(store, 2, **{"old.bin": b"old"})
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        again = _save(store, 2, **{"new.bin": b"new"})
    assert again == first and not (again / "old.bin").exists() and (again / "new.bin").read_bytes() == b"new"
    assert _names(tmp_path) == ["latest", "step_00000001", "step_00000002"]  # the moved-aside copy is gone
    assert "already exists" in caplog.text and "step_00000002" in caplog.text


# --- crash points, in-process (a `raise` fault stops commit where a crash would) --------------------


def test_raise_after_move_aside_then_reopen_restores_the_old_step(tmp_path, monkeypatch, caplog):
    store = CheckpointStore(tmp_path, keep_last=2)
    _save(store, 1)
    old = ck.read_manifest(_save(store, 2, **{"v.bin": b"1"}))
    tmp = store.begin(2)
    _raise_at(monkeypatch, tmp_path, "after_move_aside")
    with pytest.raises(Exception, match="injected fault"):
        store.commit(tmp, 2)
    aside = [n for n in _names(tmp_path) if n.startswith(".replaced-step_00000002-")]
    assert len(aside) == 1 and re.fullmatch(r"\.replaced-step_00000002-[0-9a-f]{8}", aside[0])
    assert not (tmp_path / "step_00000002").exists()
    monkeypatch.delenv("RLHF_RAY_FAULTS")
    (tmp_path / ".keep").mkdir()  # an entry listed before the moved-aside one
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        CheckpointStore(tmp_path, keep_last=2)
    assert _names(tmp_path) == [".keep", "faults", "latest", "step_00000001", "step_00000002"]
    assert ck.read_manifest(tmp_path / "step_00000002") == old
    assert f"restored {tmp_path / 'step_00000002'}" in caplog.text


def test_reopen_removes_a_moved_aside_step_whose_replacement_arrived(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=2)
    _save(store, 1)
    aside = tmp_path / ".replaced-step_00000001-0badf00d"
    aside.mkdir()
    (aside / "x").write_text("old")
    not_ours = [tmp_path / ".replaced-notes-00000000", tmp_path / ".replaced-step_1-00000000"]
    for p in not_ours:
        p.mkdir()
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        CheckpointStore(tmp_path, keep_last=2)
    assert not aside.exists() and f"removed {aside}" in caplog.text
    assert all(p.is_dir() for p in not_ours)  # not a moved-aside checkpoint: left alone
    assert ck.verify(tmp_path / "step_00000001") == []


def test_reopen_removes_temporary_files_and_dirs_only(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=2)
    _save(store, 1)
    (tmp_path / ".tmp-latest-12345678").write_text("step_00000009\n")  # a pointer tmp file
    (tmp_path / ".tmp-trash-step_00000000-12345678" / "d").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "step_00000002").mkdir()  # an incomplete step is not temporary: verify rejects it
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        CheckpointStore(tmp_path, keep_last=2)
    assert _names(tmp_path) == ["latest", "notes.txt", "step_00000001", "step_00000002"]
    assert caplog.text.count("removed stale") == 2


def test_raise_during_retention_confines_deletion_to_trash(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep_last=1)
    _save(store, 1)
    tmp = store.begin(2)
    _raise_at(monkeypatch, tmp_path, "during_retention")
    with pytest.raises(Exception, match="injected fault"):
        store.commit(tmp, 2)
    trash = [n for n in _names(tmp_path) if n.startswith(".tmp-trash-")]
    assert len(trash) == 1 and re.fullmatch(r"\.tmp-trash-step_00000001-[0-9a-f]{8}", trash[0]) and (tmp_path / trash[0] / "manifest.json").is_file()  # renamed, not yet deleted
    assert not (tmp_path / "step_00000001").exists()
    assert (tmp_path / "latest").read_text() == "step_00000002\n"


def test_raise_after_rename_leaves_latest_on_the_previous_step(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, keep_last=1)
    _save(store, 1)
    tmp = store.begin(2)
    _raise_at(monkeypatch, tmp_path, "after_rename")
    with pytest.raises(Exception, match="injected fault"):
        store.commit(tmp, 2)
    monkeypatch.delenv("RLHF_RAY_FAULTS")
    assert (tmp_path / "latest").read_text() == "step_00000001\n" and ck.verify(tmp_path / "step_00000002") == []
    store = CheckpointStore(tmp_path, keep_last=1)
    assert store.latest_valid() == tmp_path / "step_00000001"
    (tmp_path / "step_00000001" / "trainer.json").write_text("{}")
    with pytest.raises(CheckpointError) as err:  # nothing valid at or below `latest`: step_2 is still not used
        store.resolve("auto")
    assert "step_00000002: newer than `latest` (step_00000001)" in str(err.value)
    assert "; not considered (pass its path as resume to use it)\n" in str(err.value)
    assert store.resolve(tmp_path / "step_00000002") == tmp_path / "step_00000002"


# --- retention ------------------------------------------------------------------------------------


def test_retention_counts_only_complete_checkpoints(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        _save(store, step)
    (tmp_path / "step_00000003" / "manifest.json").unlink()  # incomplete: not a fallback, deleted
    with caplog.at_level(logging.INFO, logger="rlhf_ray.checkpoint"):
        _save(store, 4)
    assert [n for n in _names(tmp_path) if n.startswith("step_")] == ["step_00000001", "step_00000002",
                                                                     "step_00000004"]
    assert "retention (keep_last=3): deleted step_00000003" in caplog.text


def test_retention_leaves_newer_checkpoints_and_latest(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=1)
    for step in (5, 6):
        _save(store, step)
    assert _names(tmp_path) == ["latest", "step_00000006"]
    (tmp_path / "latest").write_text("step_00000005\n")  # resumed from an older step of an earlier run
    (tmp_path / "step_00000005").mkdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        _save(store, 3)
    assert _names(tmp_path) == ["latest", "step_00000003", "step_00000005", "step_00000006"]
    assert "step_00000005, step_00000006 newer than the checkpoint just committed" in caplog.text
    _save(store, 4)
    assert _names(tmp_path) == ["latest", "step_00000004", "step_00000005", "step_00000006"]


def test_retention_keeps_exactly_keep_last(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=2)
    for step in range(1, 5):
        _save(store, step)
        assert [n for n in _names(tmp_path) if n.startswith("step_")] == [
            ck.step_dir_name(s) for s in range(max(1, step - 1), step + 1)]
    (tmp_path / "step_00000009.bak").mkdir()  # not a checkpoint name: never touched
    (tmp_path / "step_00000001").write_text("a file with a step name")
    _save(CheckpointStore(tmp_path, keep_last=1), 5)
    assert _names(tmp_path) == ["latest", "step_00000001", "step_00000005", "step_00000009.bak"]


# --- resume -----------------------------------------------------------------------------------------


def test_resolve_auto_lists_every_rejected_candidate(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        _save(store, step)
    (tmp_path / "latest").write_text("not-a-step-name-but-quite-long-enough-to-cut-off\n")
    for step in (1, 2, 3):
        (tmp_path / ck.step_dir_name(step) / "trainer.json").unlink()
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        with pytest.raises(CheckpointError) as err:
            store.resolve("auto")
    assert str(err.value) == (
        f"resume=auto: {tmp_path} holds checkpoints but none is valid:"
        "\n  latest: corrupt (holds 'not-a-step-name-but-quite-long-enough-to')"
        "\n  step_00000003: trainer.json: missing"
        "\n  step_00000002: trainer.json: missing"
        "\n  step_00000001: trainer.json: missing"
        "\nRepair or remove them, or set resume to a checkpoint path or to off.")
    assert "`latest` pointer corrupt" in caplog.text


def test_resolve_auto_with_a_dangling_pointer_names_it(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    _save(store, 1)
    (tmp_path / "step_00000001" / "manifest.json").unlink()
    (tmp_path / "latest").write_text("step_00000007\n")
    with pytest.raises(CheckpointError) as err:
        store.resolve("auto")
    assert "\n  step_00000007: named by `latest` but does not exist" in str(err.value)
    assert "\n  step_00000001: manifest.json missing (the save did not finish)" in str(err.value)


def test_unreadable_latest_pointer_falls_back(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    _save(store, 1)
    (tmp_path / "latest").unlink()
    (tmp_path / "latest").mkdir()  # reading it is an OSError, not a missing file
    name, problem = store._read_latest()
    assert name is None and problem.startswith("unreadable (")
    assert store.latest_valid() == tmp_path / "step_00000001"


def test_resolve_auto_with_only_a_pointer_is_an_error(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    (tmp_path / "latest").write_text("step_00000001\n")
    with pytest.raises(CheckpointError, match="holds checkpoints but none is valid"):
        store.resolve("auto")


def test_resolve_auto_with_only_newer_dirs_is_an_error(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    _save(store, 2)
    (tmp_path / "latest").write_text("step_00000001\n")
    assert store.latest_valid() is None
    with pytest.raises(CheckpointError, match="named by `latest` but does not exist"):
        store.resolve("auto")


def test_resolve_off_warns_about_existing_checkpoints(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=1)
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        assert store.resolve("off") is None
    assert caplog.text == ""
    _save(store, 1)
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        assert store.resolve("off") is None
    assert "starting fresh although" in caplog.text


def test_resolve_an_explicit_path(tmp_path):
    store = CheckpointStore(tmp_path / "root", keep_last=1)
    ckpt = _save(store, 1)
    assert store.resolve(str(ckpt)) == ckpt
    (ckpt / "trainer.json").unlink()
    with pytest.raises(CheckpointError) as err:
        store.resolve(str(ckpt))
    assert str(err.value) == f"resume={ckpt}: not a valid checkpoint: trainer.json: missing"
    just_steps = tmp_path / "just_steps"
    (just_steps / "step_00000001").mkdir(parents=True)
    with pytest.raises(CheckpointError) as err:
        store.resolve(just_steps)
    assert str(err.value) == (f"resume={just_steps}: not a valid checkpoint: manifest.json missing (the save did "
                              "not finish)\nThis is a checkpoint root: pass one of its step_* directories, or resume=auto.")
    just_latest = tmp_path / "just_latest"
    just_latest.mkdir()
    (just_latest / "latest").write_text("step_00000001\n")
    with pytest.raises(CheckpointError, match="This is a checkpoint root"):
        store.resolve(just_latest)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "step_1").mkdir()
    with pytest.raises(CheckpointError) as err:
        store.resolve(tmp_path / "other")
    assert "checkpoint root" not in str(err.value)


# --- verification -----------------------------------------------------------------------------------


def test_verify_a_path_that_is_not_a_directory(tmp_path):
    assert ck.verify(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere'} does not exist"]
    (tmp_path / "file").write_text("")
    assert ck.verify(tmp_path / "file") == [f"{tmp_path / 'file'} is not a directory"]


def test_verify_accepts_any_step_in_a_dir_not_named_after_one(tmp_path):
    store = CheckpointStore(tmp_path / "root", keep_last=1)
    ckpt = _save(store, 4)
    os.rename(ckpt, tmp_path / "copied")
    assert ck.verify(tmp_path / "copied") == []


@pytest.mark.parametrize("manifest, problem", [
    ([], "not an rlhf_ray.checkpoint manifest"),
    ({"format": "other"}, "not an rlhf_ray.checkpoint manifest"),
    ({"format": "rlhf_ray.checkpoint", "format_version": "1", "step": 1, "metadata": {}, "files": []},
     "format_version '1' is not supported by this code (<= 1)"),
    ({"format": "rlhf_ray.checkpoint", "format_version": 2, "step": 1, "metadata": {}, "files": []},
     "format_version 2 is not supported by this code (<= 1)"),
    ({"format": "rlhf_ray.checkpoint", "step": 1, "metadata": {}, "files": []},
     "format_version None is not supported by this code (<= 1)"),
    ({"format": "rlhf_ray.checkpoint", "format_version": 1, "step": "1", "metadata": {}, "files": []},
     "step, metadata or files missing or of the wrong type"),
    ({"format": "rlhf_ray.checkpoint", "format_version": 1, "step": 1, "metadata": [], "files": []},
     "step, metadata or files missing or of the wrong type"),
    ({"format": "rlhf_ray.checkpoint", "format_version": 1, "step": 1, "metadata": {}, "files": {}},
     "step, metadata or files missing or of the wrong type"),
    ({"format": "rlhf_ray.checkpoint", "format_version": 1, "step": 1, "metadata": {}},
     "step, metadata or files missing or of the wrong type"),
])
def test_malformed_manifests(tmp_path, manifest, problem):
    (tmp_path / "step_00000001").mkdir()
    (tmp_path / "step_00000001" / "manifest.json").write_text(json.dumps(manifest))
    assert ck.verify(tmp_path / "step_00000001") == [f"manifest.json malformed: {problem}"]
    with pytest.raises(CheckpointError) as err:
        ck.read_manifest(tmp_path / "step_00000001")
    assert str(err.value) == f"{tmp_path / 'step_00000001'}: manifest.json malformed: {problem}"


def test_older_format_versions_are_read(tmp_path):
    _write_manifest(tmp_path, format_version=0, step=9)
    assert ck.verify(tmp_path) == [] and ck.read_manifest(tmp_path)["step"] == 9


GOOD = {"path": "a.bin", "size": 1, "sha256": "0" * 64}


@pytest.mark.parametrize("entry", [
    "a.bin", {**GOOD, "path": 3}, {**GOOD, "size": "1"}, {**GOOD, "sha256": None}, {**GOOD, "sha256": "A" * 64},
    {**GOOD, "sha256": "0" * 63}, {**GOOD, "sha256": "0" * 65}, {"path": "a.bin", "size": 1},
    {"size": 1, "sha256": "0" * 64}, {"path": "a.bin", "sha256": "0" * 64},
])
def test_bad_file_entries(tmp_path, entry):
    _write_manifest(tmp_path, files=[GOOD, entry])
    assert ck.verify(tmp_path) == [f"manifest.json malformed: bad file entry {str(entry)[:80]}"]


def test_bad_file_entry_is_shown_shortened(tmp_path):
    entry = {**GOOD, "path": "x" * 200, "size": None}
    _write_manifest(tmp_path, files=[entry])
    assert ck.verify(tmp_path) == [f"manifest.json malformed: bad file entry {str(entry)[:80]}"]


@pytest.mark.parametrize("path", ["/etc/passwd", "a/../b", "..", "./a", "a/./b", "a//b", "a/", "", "a\\b"])
def test_file_paths_must_stay_inside(tmp_path, path):
    _write_manifest(tmp_path, files=[{**GOOD, "path": path}])
    assert ck.verify(tmp_path) == [f"manifest.json malformed: file path {path!r} is not a plain relative path"]


def test_each_bad_file_is_reported(tmp_path):
    data = b"12345"
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / "sub").mkdir()
    for name in ("ok.bin", "short.bin", "flipped.bin", "sub/real.bin"):
        (tmp_path / name).write_bytes(data)
    (tmp_path / "short.bin").write_bytes(data[:-1])
    (tmp_path / "flipped.bin").write_bytes(b"12346")
    os.symlink(tmp_path / "ok.bin", tmp_path / "link.bin")
    os.symlink(tmp_path / "gone", tmp_path / "dangling.bin")
    (tmp_path / "dir.bin").mkdir()
    names = ["dangling.bin", "dir.bin", "flipped.bin", "gone.bin", "link.bin", "ok.bin", "short.bin", "sub/real.bin"]
    _write_manifest(tmp_path, files=[{"path": n, "size": 5, "sha256": digest} for n in names])
    assert ck.verify(tmp_path) == [
        "dangling.bin: not a regular file",
        "dir.bin: not a regular file",
        "flipped.bin: sha256 differs from the manifest (corrupted)",
        "gone.bin: missing",
        "link.bin: not a regular file",
        "short.bin: size 4 bytes, manifest says 5 (truncated or overwritten)",
    ]


def test_unreadable_manifest(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe not utf-8")
    assert ck.verify(tmp_path)[0].startswith("manifest.json unreadable (")
    (tmp_path / "manifest.json").unlink()
    (tmp_path / "manifest.json").mkdir()
    assert ck.verify(tmp_path)[0].startswith("manifest.json unreadable (")
    with pytest.raises(CheckpointError, match="manifest.json unreadable"):
        ck.read_manifest(tmp_path)


def test_extra_files_are_logged_by_name(tmp_path, caplog):
    _write_manifest(tmp_path)
    for i in range(7):
        (tmp_path / f"extra{i}.txt").write_text("")
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        assert ck.verify(tmp_path) == []
    assert _messages(caplog) == [f"{tmp_path}: 7 file(s) not in the manifest, ignored: "
                                 "extra0.txt, extra1.txt, extra2.txt, extra3.txt, extra4.txt"]
    caplog.clear()
    (tmp_path / "sub").mkdir()
    for i in range(7):
        (tmp_path / f"extra{i}.txt").unlink()
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        assert ck.verify(tmp_path) == []
    assert caplog.text == ""  # the manifest itself and empty directories are not extra files


# --- writers and readers ---------------------------------------------------------------------------


def test_save_and_load_json_members(tmp_path):
    path = ck.save_json(tmp_path, "deep/er/state", {"a": [1, 2.5, None]})
    assert path == tmp_path / "deep" / "er" / "state.json"
    assert path.read_text() == '{"a": [1, 2.5, null]}'
    assert ck.save_json(tmp_path, "x.json", 1) == tmp_path / "x.json"  # no second suffix
    assert ck.load_json(tmp_path, "deep/er/state") == {"a": [1, 2.5, None]}
    assert ck.load_json(tmp_path, "x.json") == 1
    with pytest.raises(CheckpointError) as err:
        ck.load_json(tmp_path, "sub/absent")
    assert str(err.value) == f"{tmp_path}: sub/absent.json missing from the checkpoint"
    with pytest.raises(CheckpointError) as err:
        ck.save_json(tmp_path, "x", 2)
    assert str(err.value) == f"{tmp_path / 'x.json'} was already written in this save: every writer needs its own name"
    assert ck.load_json(tmp_path, "x") == 1
    with pytest.raises(CheckpointError) as err:
        ck.save_json(tmp_path, "bad", {1j: 1})
    assert str(err.value).startswith(f"{tmp_path / 'bad.json'}: state is not JSON-serialisable: ")
    assert not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize("name", ["/abs", "../up", "a/../../b", "a\\b", "a//b"])
def test_member_names_stay_inside(tmp_path, name):
    with pytest.raises(CheckpointError) as err:
        ck.save_json(tmp_path, name, {})
    assert str(err.value) == f"{name!r} is not a plain relative name (no '..', no leading '/')"
    with pytest.raises(CheckpointError, match="not a plain relative name"):
        ck.load_tensors(tmp_path, name)


def test_save_and_load_tensors(tmp_path):
    t = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    path = ck.save_tensors(tmp_path, "sub/t", {"w": t, "b": torch.ones(2, dtype=torch.int8)})
    assert path == tmp_path / "sub" / "t.safetensors"
    loaded = ck.load_tensors(tmp_path, "sub/t")
    assert torch.equal(loaded["w"], t) and loaded["b"].dtype == torch.int8 and loaded["w"].device.type == "cpu"
    with pytest.raises(CheckpointError) as err:
        ck.save_tensors(tmp_path, "bad", {"ok": t, 3: t, "l": [1.0]})
    assert str(err.value) == f"{tmp_path / 'bad.safetensors'}: save_tensors takes a dict of str → Tensor; bad entries: [3, 'l']"
    many = {f"k{i}": i for i in range(8)}
    with pytest.raises(CheckpointError, match=re.escape("bad entries: ['k0', 'k1', 'k2', 'k3', 'k4']")):
        ck.save_tensors(tmp_path, "many", many)
    with pytest.raises(CheckpointError, match="t2.safetensors missing from the checkpoint"):
        ck.load_tensors(tmp_path, "sub/t2")


# --- RNG states with CUDA devices (faked: the unit tests run without GPUs) ----------------------------


class FakeCuda:
    def __init__(self, states):
        self.states, self.set = states, []

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(self.states))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(self.states))
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: list(self.states))
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: self.set.append((i, s.tolist())))


def test_cuda_rng_states_round_trip(tmp_path, monkeypatch):
    states = [torch.tensor([1, 2, 3], dtype=torch.uint8), torch.tensor([4, 5, 6], dtype=torch.uint8)]
    cuda = FakeCuda(states)
    cuda.install(monkeypatch)
    state = ck.capture_rng()
    assert [s.tolist() for s in state["cuda"]] == [[1, 2, 3], [4, 5, 6]]
    ck.save_rng(tmp_path, "rng/driver", state)
    assert json.loads((tmp_path / "rng" / "driver.json").read_text())["cuda_devices"] == 2
    assert set(ck.load_tensors(tmp_path, "rng/driver")) == {"torch", "cuda.0", "cuda.1"}
    loaded = ck.load_rng(tmp_path, "rng/driver")
    assert [s.tolist() for s in loaded["cuda"]] == [[1, 2, 3], [4, 5, 6]]
    ck.restore_rng(loaded)
    assert cuda.set == [(0, [1, 2, 3]), (1, [4, 5, 6])]


@pytest.mark.parametrize("visible, restored, warns", [(1, [(0, [1])], True), (3, [(0, [1]), (1, [2])], True),
                                                      (2, [(0, [1]), (1, [2])], False), (0, [], True)])
def test_restore_rng_restores_the_devices_it_sees(monkeypatch, caplog, visible, restored, warns):
    state = ck.capture_rng()
    state["cuda"] = [torch.tensor([1], dtype=torch.uint8), torch.tensor([2], dtype=torch.uint8)]
    cuda = FakeCuda([torch.zeros(1, dtype=torch.uint8)] * visible)
    cuda.install(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        ck.restore_rng(state)
    assert cuda.set == restored
    expected = (f"RNG state holds 2 CUDA device(s), this process sees {visible}: restoring the first "
                f"{min(2, visible)}")
    assert _messages(caplog) == ([expected] if warns else [])


def test_cpu_rng_state_without_cuda(tmp_path, monkeypatch, caplog):
    FakeCuda([]).install(monkeypatch)
    state = ck.capture_rng()
    assert set(state) == {"python", "numpy", "torch"}
    ck.save_rng(tmp_path, "rng", state)
    loaded = ck.load_rng(tmp_path, "rng")
    assert "cuda" not in loaded and json.loads((tmp_path / "rng.json").read_text())["cuda_devices"] == 0
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        ck.restore_rng(loaded)
    assert caplog.text == ""  # 0 saved, 0 visible: nothing to warn about
    assert torch.equal(torch.get_rng_state(), state["torch"])
    assert random.getstate()[1] == tuple(state["python"][1])
    np_state = np.random.get_state()
    assert np_state[1].dtype == np.uint32 and np_state[1].tolist() == state["numpy"][1]


# --- compatibility --------------------------------------------------------------------------------


def test_check_compatible_message_is_exact(caplog):
    with pytest.raises(CheckpointError) as err:
        ck.check_compatible({"a": 1, "b": "x"}, {"a": 2, "b": "x", "c": None}, allow=False)
    assert str(err.value) == ("resume refused: the checkpoint differs from this run in 2 field(s):"
                              "\n  a: checkpoint 1, this run 2\n  c: checkpoint (absent), this run None"
                              f"\nSet {ck.ALLOW_OVERRIDE} to resume anyway.")
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        ck.check_compatible({"a": 1}, {"a": 2, "c": 3}, allow=True, override="k=v")
    assert caplog.records[-1].getMessage() == ("resuming although the checkpoint differs from this run (k=v):"
                                               "\n  a: checkpoint 1, this run 2\n  c: checkpoint (absent), this run 3")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        ck.check_compatible({"a": 1, "extra": 0}, {"a": 1}, allow=True)
    assert caplog.text == ""  # fields only the checkpoint has are not compared


# --- filesystem helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize("code, swallowed", [(errno.EINVAL, True), (errno.ENOTSUP, True), (errno.EBADF, True),
                                             (errno.EIO, False)])
def test_fsync_dir_tolerates_only_unsupported(tmp_path, monkeypatch, code, swallowed):
    closed = []
    real_close = os.close

    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "close", lambda fd: closed.append(fd) or real_close(fd))
    if swallowed:
        ck._fsync_dir(tmp_path)
    else:
        with pytest.raises(OSError) as err:
            ck._fsync_dir(tmp_path)
        assert err.value.errno == code
    assert len(closed) == 1  # the directory's descriptor is closed either way


def test_write_atomic_replaces_and_leaves_no_tmp(tmp_path):
    target = tmp_path / "pointer"
    ck._write_atomic(target, "one\n")
    ck._write_atomic(target, "two\n")
    assert target.read_text() == "two\n" and _names(tmp_path) == ["pointer"]


def test_remove_files_dirs_and_links(tmp_path):
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "f").write_text("")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "keep").write_text("")
    os.symlink(tmp_path / "target", tmp_path / "link")
    for name in ("d", "f", "link", "absent"):
        ck._remove(tmp_path / name)
    assert _names(tmp_path) == ["target"] and (tmp_path / "target" / "keep").exists()


def test_commit_fsyncs_every_file_and_directory(tmp_path, monkeypatch):
    """Durability: each file and directory of the save, the manifest, the root and `latest` are fsynced."""
    store = CheckpointStore(tmp_path, keep_last=1)
    tmp = store.begin(1)
    ck.save_json(tmp, "trainer", {})
    ck.save_json(tmp, "a/b/state", {})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    store.commit(tmp, 1)
    inside = sorted({os.path.relpath(p, tmp) for p in synced if p.startswith(str(tmp)) and ".tmp-manifest" not in p})
    assert inside == [".", "a", "a/b", "a/b/state.json", "trainer.json"]
    dirs = [os.path.relpath(p, tmp) for p in synced if p.startswith(str(tmp)) and not p.endswith(".json")
            and ".tmp-manifest" not in p]
    assert dirs[:3] == ["a/b", "a", "."]  # deepest first: a directory after the entries it holds (then the manifest)
    assert any(re.fullmatch(rf"{re.escape(str(tmp))}/\.tmp-manifest\.json-[0-9a-f]{{8}}", p) for p in synced)
    assert any(re.fullmatch(rf"{re.escape(str(tmp_path))}/\.tmp-latest-[0-9a-f]{{8}}", p) for p in synced)
    assert synced.count(str(tmp_path)) >= 2  # after the rename into place and after `latest`


def test_fsync_dir_opens_only_directories(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        ck._fsync_dir(tmp_path / "file")


def test_hash_file_syncs_only_when_asked(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"abc")
    synced = []
    monkeypatch.setattr(os, "fsync", synced.append)
    assert ck._hash_file(tmp_path / "f") == (3, hashlib.sha256(b"abc").hexdigest()) and synced == []
    assert ck._hash_file(tmp_path / "f", sync=True) == (3, hashlib.sha256(b"abc").hexdigest()) and len(synced) == 1


def test_resume_log_lines_name_the_checkpoint(tmp_path, caplog):
    """What an operator reads to know where a run resumed from, and why it skipped something."""
    store = CheckpointStore(tmp_path, keep_last=3)
    with caplog.at_level(logging.INFO, logger="rlhf_ray.checkpoint"):
        store.resolve("auto")
    assert _messages(caplog) == [f"resume=auto: no checkpoint under {tmp_path}, starting fresh"]
    for step in (1, 2):
        _save(store, step)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlhf_ray.checkpoint"):
        store.resolve("off")
        store.resolve("auto")
        store.resolve(tmp_path / "step_00000001")
    assert _messages(caplog) == [f"resume=off: starting fresh although {tmp_path} holds checkpoints",
                                 f"resume=auto: resuming from {tmp_path / 'step_00000002'}",
                                 f"resuming from {tmp_path / 'step_00000001'}"]
    (tmp_path / "latest").write_text("step_00000009\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        store.latest_valid()
    assert _messages(caplog) == [f"{tmp_path}: `latest` names step_00000009, which does not exist; falling back"]
    (tmp_path / "latest").write_bytes(b"\xff\xfe")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlhf_ray.checkpoint"):
        assert store.latest_valid() == tmp_path / "step_00000002"
    assert _messages(caplog) == [f"{tmp_path}: `latest` pointer corrupt (holds '\ufffd\ufffd'); trying the newest "
                                 "step_* directory"]
    (tmp_path / "latest").write_text("step_00000001\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="rlhf_ray.checkpoint"):
        assert store.latest_valid() == tmp_path / "step_00000001"
    assert _messages(caplog) == [f"{tmp_path / 'step_00000002'} newer than `latest` (step_00000001): left by an "
                                 "interrupted save or an earlier run; not considered"]
    (tmp_path / "latest").write_text("step_00000002\n")
    (tmp_path / "step_00000002" / "trainer.json").unlink()
    (tmp_path / "step_00000002" / "manifest.json").write_text(
        (tmp_path / "step_00000002" / "manifest.json").read_text().replace('"step": 2', '"step": 3'))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        assert store.latest_valid() == tmp_path / "step_00000001"
    assert _messages(caplog) == [f"checkpoint {tmp_path / 'step_00000002'} skipped: manifest step 3 does not match "
                                 "the directory name; trainer.json: missing"]


def test_resolve_auto_without_a_pointer_uses_the_newest_valid_dir(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=3)
    for step in (1, 2):
        _save(store, step)
    (tmp_path / "latest").unlink()
    assert store.resolve("auto") == tmp_path / "step_00000002"
    assert store._scan() == (tmp_path / "step_00000002", [])


def test_resolve_auto_with_a_corrupt_pointer_and_no_dirs(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    (tmp_path / "latest").write_text("junk")
    assert store.latest_valid() is None
    with pytest.raises(CheckpointError) as err:
        store.resolve("auto")
    assert str(err.value) == (f"resume=auto: {tmp_path} holds checkpoints but none is valid:"
                              "\n  latest: corrupt (holds 'junk')"
                              "\nRepair or remove them, or set resume to a checkpoint path or to off.")


def test_every_problem_of_a_checkpoint_is_listed(tmp_path):
    store = CheckpointStore(tmp_path, keep_last=1)
    ckpt = _save(store, 1, **{"x.bin": b"x"})
    (ckpt / "x.bin").unlink()
    (ckpt / "trainer.json").unlink()
    with pytest.raises(CheckpointError) as err:
        store.resolve(ckpt)
    assert str(err.value) == f"resume={ckpt}: not a valid checkpoint: trainer.json: missing; x.bin: missing"
    with pytest.raises(CheckpointError) as err:
        store.resolve("auto")
    assert "\n  step_00000001: trainer.json: missing; x.bin: missing\n" in str(err.value)


def test_save_log_lines(tmp_path, caplog):
    """What an operator reads about saves: each commit, a replaced step, each deletion by retention."""
    store = CheckpointStore(tmp_path, keep_last=1)
    with caplog.at_level(logging.INFO, logger="rlhf_ray.checkpoint"):
        _save(store, 1, **{"x.bin": b"x"})
        _save(store, 1)
        _save(store, 2)
    assert _messages(caplog) == [
        f"checkpoint {tmp_path / 'step_00000001'} committed (2 files)",
        f"checkpoint {tmp_path / 'step_00000001'} already exists: replacing it with the new save",
        f"checkpoint {tmp_path / 'step_00000001'} committed (1 files)",
        "retention (keep_last=1): deleted step_00000001",
        f"checkpoint {tmp_path / 'step_00000002'} committed (1 files)",
    ]
    (tmp_path / "step_00000007").mkdir()
    (tmp_path / "step_00000005").mkdir()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        _save(store, 3)
    assert _messages(caplog) == [f"{tmp_path}: step_00000005, step_00000007 newer than the checkpoint just "
                                 "committed: left in place, not used by resume"]


def test_recovery_log_lines(tmp_path, caplog):
    store = CheckpointStore(tmp_path, keep_last=2)
    _save(store, 1)
    restored, removed, stale = (tmp_path / ".replaced-step_00000002-00000000", tmp_path / ".replaced-step_00000001-00000000",
                                tmp_path / ".tmp-step_00000003-00000000")
    for p in (restored, removed, stale):
        p.mkdir()
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.checkpoint"):
        CheckpointStore(tmp_path, keep_last=2)
    assert _messages(caplog) == [f"removed {removed}: the save replacing it completed",
                                 f"restored {tmp_path / 'step_00000002'}: the save replacing it was interrupted",
                                 f"removed stale {stale} (left by an interrupted save)"]


@pytest.mark.parametrize("leftover", [None, ".tmp-step_00000002-00000000", ".replaced-step_00000002-00000000",
                                      ".replaced-step_00000001-00000000"])
def test_recovery_fsyncs_the_root_only_when_it_changed_it(tmp_path, monkeypatch, leftover):
    _save(CheckpointStore(tmp_path, keep_last=2), 1)
    if leftover:
        (tmp_path / leftover).mkdir()
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    CheckpointStore(tmp_path, keep_last=2)
    assert synced == ([str(tmp_path)] if leftover else [])


@pytest.mark.parametrize("name", ["", "rng/", ".json"])
def test_a_member_needs_a_name_before_its_suffix(tmp_path, name):
    with pytest.raises(CheckpointError, match="is not a plain relative name"):
        ck.save_json(tmp_path, name, {"a": 1})
    assert not list(tmp_path.rglob("*.json"))
