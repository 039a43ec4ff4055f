"""Atomic checkpoints: one directory per step, a manifest of every file's size and sha256, a
`latest` pointer, retention, and verified resume (issue 6 items 1-2; ARCHITECTURE.md §8).

Layout of a checkpoint root:

    <root>/latest                         # one line: the name of the newest committed checkpoint
    <root>/step_00000020/                 # a committed checkpoint, filled by several writers
        manifest.json                     # written last: step, format_version, created_at,
                                          #   metadata, and {path, size, sha256} of every file
        trainer.json                      # e.g. driver state (save_json)
        rng/driver.json, rng/driver.safetensors   # save_rng(capture_rng())
        policy/...                        # e.g. every rank's DeepSpeed save_checkpoint
    <root>/.tmp-step_00000030-1a2b3c4d/   # a save in progress: begin() → writers → commit()

A save is `tmp = store.begin(step)`, then every writer puts its files under `tmp` (the driver
with `save_json` / `save_tensors` / `save_rng`, each DeepSpeed rank with its `save_checkpoint`),
then, once every writer has returned, `store.commit(tmp, step, metadata)`. commit runs these
steps; the name in brackets is its fault-injection point, reached just after the step:

1. hash every file, fsync files and directories                        [after_files]
2. write manifest.json inside the tmp dir (tmp file, fsync, rename)    [after_manifest]
3. only if step_N already exists: rename it to `.replaced-step_N-*`    [after_move_aside]
4. rename the tmp dir to step_N, fsync the root                        [after_rename]
5. replace `latest` (tmp file, fsync, rename, fsync the root)          [after_latest]
6. retention: rename each old checkpoint to `.tmp-trash-*`, delete it  [during_retention]

What a crash leaves, and what the next `CheckpointStore` on the root does with it:
- before 4: the new checkpoint exists only as `.tmp-*` (deleted at startup); a step_N moved
  aside in 3 is renamed back (startup restores `.replaced-step_N-*` when step_N is absent).
- between 4 and 5: step_N is complete but `latest` still names the previous checkpoint, which
  resume uses; step_N is ignored (logged) until a later save of step N replaces it.
- after 5: the new checkpoint is in force; a half-done deletion is confined to a `.tmp-trash-*`
  directory (deleted at startup); retention finishes at the next commit.

Guarantees:
- A `step_*` directory appears only by renaming a tmp dir whose manifest was written last, and
  leaves only by being renamed away before deletion: no `step_*` is ever half-written or
  half-deleted (filesystem damage and hand edits are caught by `verify`).
- `latest` is replaced atomically and only after the directory it names is in place and
  fsynced, so it never names an incomplete checkpoint.
- Old checkpoints are deleted only after the new one is complete and `latest` names it;
  retention reads the root each time (no in-memory list) and never deletes `latest`'s target.
- Resume verifies every listed file (size and sha256). `resolve("auto")` skips a checkpoint
  that fails, with a one-line logged reason, and falls back to the previous one; if checkpoints
  exist and none is valid it raises, never starting fresh silently.
- Nothing here unpickles: tensors are safetensors, other state JSON; `torch.load` is never
  called. Caveat for callers: DeepSpeed's own `load_checkpoint` unpickles its engine files
  (deepspeed 0.19.8 loads them with pickle enabled). The manifest proves a file is the one
  the run wrote (integrity), not who wrote it: resume only from checkpoint roots you trust as
  you trust code.

Verification (`verify`): the manifest is present, readable, of a known format version, and its
step matches the directory name; every listed file exists with its size and sha256. Files not
in the manifest are tolerated (logged as a warning): the manifest defines the checkpoint,
loaders read files by name, and a stray file (an editor backup, NFS's `.nfs*`) must not make
resume discard a good checkpoint. Retention counts a checkpoint as complete when it has a
manifest; it does not re-hash (bit rot between saves is found at resume; keep_last >= 2 leaves
a fallback).

Requirements: the root is on a POSIX filesystem where rename is atomic (local disk, NFS, Lustre;
not object-store FUSE mounts such as s3fs or gcsfuse), visible to every writer (shared storage
on multi-node runs). Exactly one `CheckpointStore` per root, in the driver: opening a store
deletes `.tmp-*` entries, so ranks never open one; they receive the tmp dir's path and use the
module functions. Checkpoints newer than `latest` (from a crash between 4 and 5, or from an
earlier run resumed at an older step) are ignored by resume and left alone by retention.

Storage faults: every write (begin, the writers, commit, `latest`, retention, the startup
clean-up) turns an error of the filesystem into one `StorageError` line naming the path, the errno
and the fix: a full disk (ENOSPC), a quota (EDQUOT), the file-size limit (EFBIG), a read-only mount
(EROFS), permissions (EACCES, EPERM), an I/O error (EIO); any other OSError names its errno. Some
writers say it without an errno: safetensors ("os error 28") and torch's legacy writer ("failed
with No space left on device") in the message; torch's zip writer, which DeepSpeed uses, not at all
("unexpected pos"), so after its RuntimeError the filesystem itself is asked (read-only flag, a
64 KiB test write beside the file). A commit the storage refuses before `latest` moved is undone:
the new step_N leaves (on a full disk it would keep the space the next save needs) and a step_N it
replaced comes back. The writer's `abort(tmp)` deletes the tmp dir: on a full disk that frees the
space; on a read-only one it cannot, and the next store's startup does. `latest` keeps naming the
previous, complete checkpoint. Only retention fails after `latest` moved: the new checkpoint is
then in force and the old one intact (renamed away whole or not at all).

Fault injection (tests): with `RLHF_RAY_FAULTS` containing `crash@checkpoint.<point>` (see
`rlhf_ray.faults`), commit prints one line to stderr and ends the process with
`os._exit(FAULT_EXIT_CODE)` at that point: no cleanup runs, as in a real crash. Points: `FAULT_POINTS`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from rlhf_ray import faults

logger = logging.getLogger(__name__)

FORMAT = "rlhf_ray.checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
FAULT_POINTS = ("after_files", "after_manifest", "after_move_aside", "after_rename", "after_latest", "during_retention")
FAULT_EXIT_CODE = faults.CRASH_EXIT_CODE
ALLOW_OVERRIDE = "checkpoint.allow_incompatible_resume=true"

_TMP = ".tmp-"  # in-progress saves, pointer tmp files, trash: deleted when a store opens the root
_REPLACED = ".replaced-"  # a step_N moved aside while a new step_N is renamed in
_STEP_NAME = re.compile(r"step_(\d{8,})")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
_PROBE_BYTES = 64 << 10  # a write failed without an errno: can this much still be written beside it?
_ELSEWHERE = "or point checkpoint.dir at other storage"
_STORAGE_FIXES = {  # errno → what to do about it
    errno.ENOSPC: f"free space there (a save needs room for checkpoint.keep_last + 1 checkpoints) {_ELSEWHERE}",
    errno.EDQUOT: f"free space within the disk quota or raise it, {_ELSEWHERE}",
    errno.EFBIG: "raise the file-size limit (ulimit -f) or point checkpoint.dir at a filesystem allowing larger files",
    errno.EROFS: f"remount that filesystem read-write {_ELSEWHERE}",
    errno.EACCES: f"make the directory writable by this user {_ELSEWHERE}",
    errno.EPERM: f"make the directory writable by this user {_ELSEWHERE}",
    errno.EIO: f"check the device or the network storage (dmesg) {_ELSEWHERE}",
}
_T = TypeVar("_T")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found, verified or resumed; the message says which and why."""


class StorageError(CheckpointError):
    """The filesystem refused a checkpoint write: one line naming the path, the errno and the fix."""

    def __init__(self, path: str | os.PathLike, code: int, reason: str, doing: str = "write checkpoint"):
        self.path, self.errno, self.reason, self.doing = str(path), code, reason, doing
        fix = _STORAGE_FIXES.get(code, f"check that filesystem {_ELSEWHERE}")
        super().__init__(f"cannot {doing} {path}: {reason}: {fix}")

    def __reduce__(self):  # crosses process boundaries (a rank's save → the driver)
        return (StorageError, (self.path, self.errno, self.reason, self.doing))


@contextmanager
def storage_errors(path: str | os.PathLike, doing: str = "write checkpoint") -> Iterator[None]:
    """Raise a StorageError naming `path` when the body fails because the storage refused a write
    (see `_storage_reason`); other errors pass through unchanged."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:
        found = _storage_reason(err, Path(path))
        if found is None:
            raise
        for e in _exception_chain(err):  # a writer's frames may hold its half-written file open (torch's zip
            traceback.clear_frames(e.__traceback__)  # writer does): close it now, so deleting it frees the space
        raise StorageError(path, *found, doing=doing) from err


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(name: str) -> int | None:
    """The step of a checkpoint directory name, or None when `name` is not exactly one."""
    m = _STEP_NAME.fullmatch(name)
    return int(m.group(1)) if m and name == step_dir_name(int(m.group(1))) else None


# ---------------------------------------------------------------------------------------------
# The store: begin / commit / retention / resume
# ---------------------------------------------------------------------------------------------


class CheckpointStore:
    """The checkpoints of one run under `root` (see the module docstring for the protocol)."""

    def __init__(self, root: str | os.PathLike, keep_last: int) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        with storage_errors(self.root, "create the checkpoint directory"):
            self.root.mkdir(parents=True, exist_ok=True)
        self._recover()

    def begin(self, step: int) -> Path:
        """A fresh, empty directory on the root's filesystem where the writers of `step` put their files."""
        _check_step(step)
        tmp = self.root / f"{_TMP}{step_dir_name(step)}-{secrets.token_hex(4)}"
        with storage_errors(tmp):
            tmp.mkdir()
        return tmp

    def commit(self, tmp_dir: str | os.PathLike, step: int, metadata: dict[str, Any] | None = None) -> Path:
        """Seal `tmp_dir` (from `begin(step)`, all writers done) as `<root>/step_N`, point `latest`
        at it, then apply retention. Returns the checkpoint directory."""
        tmp_dir = Path(tmp_dir)
        _check_step(step)
        if (not tmp_dir.is_dir() or tmp_dir.parent.resolve() != self.root.resolve()
                or not tmp_dir.name.startswith(f"{_TMP}{step_dir_name(step)}-")):
            raise CheckpointError(f"{tmp_dir} is not a directory made by begin({step}) of the store at {self.root}")
        try:
            metadata = json.loads(json.dumps(metadata or {}))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint metadata is not JSON-serialisable: {e}") from e
        final = self.root / step_dir_name(step)
        replaced: Path | None = None  # a step_N moved aside, once it is
        installed = False  # tmp_dir renamed to final
        try:
            files = self._seal(tmp_dir, step, metadata)
            if final.exists():  # e.g. a step_N left by a crash before `latest` moved, saved again after resume
                aside = self.root / f"{_REPLACED}{final.name}-{secrets.token_hex(4)}"
                with storage_errors(final, "move aside the existing checkpoint"):
                    os.rename(final, aside)
                    replaced = aside
                    _fsync_dir(self.root)
                logger.warning("checkpoint %s already exists: replacing it with the new save", final)
                _fault("after_move_aside")
            with storage_errors(final):
                os.rename(tmp_dir, final)
                installed = True
                _fsync_dir(self.root)
            _fault("after_rename")
            with storage_errors(self.root / LATEST):
                _write_atomic(self.root / LATEST, final.name + "\n")
        except StorageError:  # other errors leave what a crash would, for the next store's startup
            self._undo(final if installed else None, replaced)
            raise
        _fault("after_latest")
        if replaced is not None:
            with storage_errors(replaced, "delete the replaced checkpoint"):
                _remove(replaced)
        self._apply_retention(step)
        logger.info("checkpoint %s committed (%d files)", final, files)
        return final

    def abort(self, tmp_dir: str | os.PathLike) -> None:
        """Delete the tmp dir of a save that failed, as far as the storage lets us: on a full disk
        this frees the space; what cannot be deleted (read-only) the next store's startup deletes."""
        tmp_dir = Path(tmp_dir)
        if tmp_dir.parent.resolve() != self.root.resolve() or not tmp_dir.name.startswith(_TMP):
            raise CheckpointError(f"{tmp_dir} is not a tmp dir of the store at {self.root}")
        try:
            _remove(tmp_dir)
        except OSError as e:
            logger.warning("could not delete %s after the failed save (%s); the next CheckpointStore on %s will",
                           tmp_dir, e, self.root)

    def latest_name(self) -> str | None:
        """The checkpoint name `latest` holds (not verified), or None."""
        return self._read_latest()[0]

    def latest_valid(self) -> Path | None:
        """The checkpoint `latest` names, or the newest older one that verifies; None if none does."""
        return self._scan()[0]

    def resolve(self, resume: str | os.PathLike) -> Path | None:
        """The checkpoint to resume from: `"off"` → None; `"auto"` → `latest_valid()`, None when the
        root holds no checkpoint at all, an error when it holds some and none is valid; any other
        value is the path of one checkpoint directory, which must verify."""
        if resume == "off":
            if self._step_dirs():
                logger.warning("resume=off: starting fresh although %s holds checkpoints", self.root)
            return None
        if resume == "auto":
            if not self._step_dirs() and not (self.root / LATEST).exists():
                logger.info("resume=auto: no checkpoint under %s, starting fresh", self.root)
                return None
            found, rejected = self._scan()
            if found is None:
                lines = "".join(f"\n  {name}: {'; '.join(problems)}" for name, problems in rejected)
                raise CheckpointError(
                    f"resume=auto: {self.root} holds checkpoints but none is valid:{lines}\n"
                    "Repair or remove them, or set resume to a checkpoint path or to off.")
            logger.info("resume=auto: resuming from %s", found)
            return found
        path = Path(resume)
        problems = verify(path)
        if problems:
            hint = ""
            if (path / LATEST).is_file() or any(_step_of(p.name) is not None for p in _children(path)):
                hint = "\nThis is a checkpoint root: pass one of its step_* directories, or resume=auto."
            raise CheckpointError(f"resume={resume}: not a valid checkpoint: {'; '.join(problems)}{hint}")
        logger.info("resuming from %s", path)
        return path

    # --- internals --------------------------------------------------------------------------

    def _seal(self, tmp_dir: Path, step: int, metadata: dict[str, Any]) -> int:
        """Steps 1-2: hash and fsync every file, write the manifest last; → the number of files."""
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "metadata": metadata,
            "files": _seal_files(tmp_dir),
        }
        _fault("after_files")
        with storage_errors(tmp_dir / MANIFEST):
            _write_atomic(tmp_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        _fault("after_manifest")
        return len(manifest["files"])

    def _undo(self, installed: Path | None, replaced: Path | None) -> None:
        """Take back a commit the storage refused before `latest` named its checkpoint (on a full
        disk, a step_N left in place would keep the space the next save needs): delete the new
        checkpoint if it was renamed in, rename the step_N it replaced back (a tmp dir not yet
        renamed is the caller's to `abort`). Best effort: what the storage refuses, the next
        store's startup settles (module docstring)."""
        if installed is not None and self.latest_name() == installed.name:
            return  # `latest` was replaced before the error (e.g. a failed fsync): the new checkpoint is in force
        try:
            if installed is not None:
                trash = self.root / f"{_TMP}trash-{installed.name}-{secrets.token_hex(4)}"
                os.rename(installed, trash)
                _remove(trash)
            if replaced is not None:
                os.rename(replaced, self.root / replaced.name[len(_REPLACED):].rsplit("-", 1)[0])
            _fsync_dir(self.root)
        except OSError as e:
            logger.warning("could not undo the failed commit under %s (%s); the next CheckpointStore there will",
                           self.root, e)

    def _step_dirs(self) -> dict[int, Path]:
        """Every `step_*` directory on disk, by step."""
        dirs = {}
        for p in _children(self.root):
            step = _step_of(p.name)
            if step is not None and p.is_dir():
                dirs[step] = p
        return dirs

    def _read_latest(self) -> tuple[str | None, str | None]:
        """(the directory name `latest` holds, or None; a problem with the pointer, or None)."""
        try:
            text = (self.root / LATEST).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, f"unreadable ({e})"
        name = text.strip()
        if _step_of(name) is None:
            return None, f"corrupt (holds {text[:40]!r})"
        return name, None

    def _scan(self) -> tuple[Path | None, list[tuple[str, list[str]]]]:
        """Walk the candidates newest first from `latest`; return the first that verifies and the
        (name, problems) of each one rejected or ignored on the way."""
        dirs = self._step_dirs()
        name, problem = self._read_latest()
        rejected: list[tuple[str, list[str]]] = []
        if problem:
            logger.warning("%s: `latest` pointer %s; trying the newest step_* directory", self.root, problem)
            rejected.append((LATEST, [problem]))
        top = _step_of(name) if name else max(dirs, default=-1)
        if name and top not in dirs:
            logger.warning("%s: `latest` names %s, which does not exist; falling back", self.root, name)
            rejected.append((name, ["named by `latest` but does not exist"]))
        for step in sorted(s for s in dirs if s > top):
            why = f"newer than `latest` ({name}): left by an interrupted save or an earlier run; not considered"
            logger.info("%s %s", dirs[step], why)
            rejected.append((dirs[step].name, [why + " (pass its path as resume to use it)"]))
        for step in sorted((s for s in dirs if s <= top), reverse=True):
            problems = verify(dirs[step])
            if not problems:
                return dirs[step], rejected
            logger.warning("checkpoint %s skipped: %s", dirs[step], "; ".join(problems))
            rejected.append((dirs[step].name, problems))
        return None, rejected

    def _apply_retention(self, latest_step: int) -> None:
        """Keep `latest` and the newest keep_last - 1 complete checkpoints older than it; delete the
        rest of the older ones. Each is renamed into the trash first, so none is ever half-deleted."""
        dirs = self._step_dirs()
        older = sorted((s for s in dirs if s < latest_step), reverse=True)
        kept = [s for s in older if (dirs[s] / MANIFEST).is_file()][: self.keep_last - 1]
        for step in older:
            if step in kept:
                continue
            trash = self.root / f"{_TMP}trash-{dirs[step].name}-{secrets.token_hex(4)}"
            with storage_errors(dirs[step], "delete the old checkpoint"):
                os.rename(dirs[step], trash)
                _fsync_dir(self.root)
            _fault("during_retention")
            with storage_errors(trash, "delete the old checkpoint"):
                shutil.rmtree(trash)
            logger.info("retention (keep_last=%d): deleted %s", self.keep_last, dirs[step].name)
        newer = [dirs[s].name for s in dirs if s > latest_step]
        if newer:
            logger.warning("%s: %s newer than the checkpoint just committed: left in place, not used by resume",
                           self.root, ", ".join(sorted(newer)))

    def _recover(self) -> None:
        """Clean up after interrupted saves: put back a step_N moved aside whose replacement never
        arrived, delete everything temporary."""
        changed = False
        for p in _children(self.root):
            target = self.root / p.name[len(_REPLACED):].rsplit("-", 1)[0]
            if not p.name.startswith(_REPLACED) or _step_of(target.name) is None:
                continue
            with storage_errors(p, "clean up"):
                if target.exists():
                    _remove(p)
                    logger.warning("removed %s: the save replacing it completed", p)
                else:
                    os.rename(p, target)
                    logger.warning("restored %s: the save replacing it was interrupted", target)
            changed = True
        for p in _children(self.root):
            if p.name.startswith(_TMP):
                with storage_errors(p, "clean up"):
                    _remove(p)
                logger.warning("removed stale %s (left by an interrupted save)", p)
                changed = True
        if changed:
            with storage_errors(self.root, "clean up"):
                _fsync_dir(self.root)


# ---------------------------------------------------------------------------------------------
# Manifest and verification
# ---------------------------------------------------------------------------------------------


def read_manifest(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a checkpoint (step, metadata, files, ...); CheckpointError if absent or malformed."""
    manifest, problem = _load_manifest(Path(ckpt_dir))
    if problem:
        raise CheckpointError(f"{ckpt_dir}: {problem}")
    return manifest


def verify(ckpt_dir: str | os.PathLike) -> list[str]:
    """Problems of a checkpoint directory, one line each; [] when it is complete and intact.
    Files not listed in the manifest are tolerated and logged (see the module docstring)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return [f"{d} {'is not a directory' if d.exists() else 'does not exist'}"]
    manifest, problem = _load_manifest(d)
    if problem:
        return [problem]
    problems = []
    named_step = _step_of(d.name)
    if named_step is not None and named_step != manifest["step"]:
        problems.append(f"manifest step {manifest['step']} does not match the directory name")
    entries = manifest["files"]
    problems += [f"{e['path']}: {p}" for e, p in zip(entries, _map_threads(lambda e: _check_file(d, e), entries)) if p]
    extra = sorted(_list_files(d) - {e["path"] for e in entries} - {MANIFEST})
    if extra:
        logger.warning("%s: %d file(s) not in the manifest, ignored: %s", d, len(extra), ", ".join(extra[:5]))
    return problems


def _load_manifest(d: Path) -> tuple[dict[str, Any], str | None]:
    try:
        manifest = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, f"{MANIFEST} missing (the save did not finish)"
    except (OSError, ValueError) as e:
        return {}, f"{MANIFEST} unreadable ({e})"
    problem = _manifest_problem(manifest)
    return manifest, (f"{MANIFEST} malformed: {problem}" if problem else None)


def _manifest_problem(m: Any) -> str | None:
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        return f"not an {FORMAT} manifest"
    version = m.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        return f"format_version {version!r} is not supported by this code (<= {FORMAT_VERSION})"
    types = {"step": int, "metadata": dict, "files": list}
    if not all(isinstance(m.get(key), t) for key, t in types.items()):
        return "step, metadata or files missing or of the wrong type"
    for e in m["files"]:
        if not (isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("size"), int)
                and isinstance(e.get("sha256"), str) and _SHA256.fullmatch(e["sha256"])):
            return f"bad file entry {str(e)[:80]}"
        if not _safe_relative(e["path"]):
            return f"file path {e['path']!r} is not a plain relative path"
    return None


def _check_file(d: Path, entry: dict[str, Any]) -> str | None:
    path = d / entry["path"]
    if path.is_symlink() or not path.is_file():
        return "missing" if not path.exists() and not path.is_symlink() else "not a regular file"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"size {size} bytes, manifest says {entry['size']} (truncated or overwritten)"
    if _hash_file(path)[1] != entry["sha256"]:
        return "sha256 differs from the manifest (corrupted)"
    return None


def _seal_files(tmp_dir: Path) -> list[dict[str, Any]]:
    """Hash and fsync every file under `tmp_dir`, fsync its directories; the manifest's file list."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(tmp_dir):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            if p.is_symlink():
                raise CheckpointError(f"{p}: a checkpoint must be self-contained; symbolic links are not allowed")
            if name in filenames:
                if not p.is_file():
                    raise CheckpointError(f"{p}: not a regular file")
                paths.append(p)
    rel = [p.relative_to(tmp_dir).as_posix() for p in paths]
    if MANIFEST in rel:
        raise CheckpointError(f"{tmp_dir / MANIFEST}: the name {MANIFEST} is reserved for the checkpoint's manifest")
    sealed = _map_threads(_sync_file, paths)
    for dirpath, _, _ in sorted(os.walk(tmp_dir), key=lambda w: -len(w[0])):  # deepest first
        with storage_errors(dirpath):
            _fsync_dir(Path(dirpath))
    return sorted(({"path": r, "size": s, "sha256": h} for r, (s, h) in zip(rel, sealed)), key=lambda e: e["path"])


def _sync_file(path: Path) -> tuple[int, str]:
    with storage_errors(path):
        return _hash_file(path, sync=True)


# ---------------------------------------------------------------------------------------------
# Writers and readers (any process; ranks get the tmp dir's path, never a store)
# ---------------------------------------------------------------------------------------------


def save_json(directory: str | os.PathLike, name: str, obj: Any) -> Path:
    """Write `obj` as `<directory>/<name>.json` (`name` may hold subdirectories); each name once per save."""
    path = _new_member(directory, name, ".json")
    try:
        text = json.dumps(obj)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: state is not JSON-serialisable: {e}") from e
    with storage_errors(path), open(path, "x", encoding="utf-8") as f:
        f.write(text)
    return path


def load_json(ckpt_dir: str | os.PathLike, name: str) -> Any:
    return json.loads(_existing_member(ckpt_dir, name, ".json").read_text(encoding="utf-8"))


def save_tensors(directory: str | os.PathLike, name: str, tensors: dict[str, Tensor]) -> Path:
    """Write `tensors` as `<directory>/<name>.safetensors` (moved to CPU, made contiguous)."""
    path = _new_member(directory, name, ".safetensors")
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{path}: save_tensors takes a dict of str → Tensor; bad entries: {bad[:5]}")
    with storage_errors(path):
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    return path


def load_tensors(ckpt_dir: str | os.PathLike, name: str) -> dict[str, Tensor]:
    return load_file(str(_existing_member(ckpt_dir, name, ".safetensors")), device="cpu")


def capture_rng() -> dict[str, Any]:
    """This process's global RNG states: Python `random` and NumPy's global state as JSON lists,
    torch's CPU generator (and every CUDA device's, when available) as uint8 tensors.
    Generators the caller owns (torch.Generator, np.random.Generator) are the caller's to save."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo `capture_rng`: later draws equal the draws that followed the capture."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(cuda) != available:
        logger.warning("RNG state holds %d CUDA device(s), this process sees %d: restoring the first %d",
                       len(cuda), available, min(len(cuda), available))
    for i, s in enumerate(cuda[:available]):
        torch.cuda.set_rng_state(s, i)


def save_rng(directory: str | os.PathLike, name: str, state: dict[str, Any]) -> None:
    """Write a `capture_rng()` state as `<name>.json` + `<name>.safetensors`."""
    cuda = state.get("cuda") or []
    save_json(directory, name, {"python": state["python"], "numpy": state["numpy"], "cuda_devices": len(cuda)})
    save_tensors(directory, name, {"torch": state["torch"], **{f"cuda.{i}": s for i, s in enumerate(cuda)}})


def load_rng(ckpt_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """Read a state written by `save_rng`, ready for `restore_rng`."""
    meta, tensors = load_json(ckpt_dir, name), load_tensors(ckpt_dir, name)
    state = {"python": meta["python"], "numpy": meta["numpy"], "torch": tensors["torch"]}
    if meta["cuda_devices"]:
        state["cuda"] = [tensors[f"cuda.{i}"] for i in range(meta["cuda_devices"])]
    return state


def check_compatible(saved: dict[str, Any], current: dict[str, Any], allow: bool,
                     override: str = ALLOW_OVERRIDE) -> None:
    """Refuse to resume when a field of `current` (the fields the caller says must match: world
    sizes, model paths, dataset, stage, ...) differs from `saved` (the same dict stored in the
    checkpoint's metadata), naming each field with both values; with `allow`, log and go on."""
    current = json.loads(json.dumps(current))  # as `saved` went through JSON: tuples → lists
    diffs = [f"{key}: checkpoint {repr(saved[key]) if key in saved else '(absent)'}, this run {value!r}"
             for key, value in current.items() if key not in saved or saved[key] != value]
    if not diffs:
        return
    listing = "".join(f"\n  {d}" for d in diffs)
    if allow:
        logger.warning("resuming although the checkpoint differs from this run (%s):%s", override, listing)
        return
    raise CheckpointError(f"resume refused: the checkpoint differs from this run in {len(diffs)} field(s):"
                          f"{listing}\nSet {override} to resume anyway.")


# ---------------------------------------------------------------------------------------------
# Fault injection
# ---------------------------------------------------------------------------------------------


def _fault(point: str) -> None:
    """A fault-injection point `checkpoint.<point>` (rlhf_ray.faults): `crash@checkpoint.<point>` ends
    the process here with os._exit, as a real crash would, leaving whatever was written so far."""
    if point not in FAULT_POINTS:
        raise ValueError(f"unknown checkpoint fault point {point!r}; points: {FAULT_POINTS}")
    faults.fire("checkpoint", point)


# ---------------------------------------------------------------------------------------------
# Filesystem helpers
# ---------------------------------------------------------------------------------------------


def _check_step(step: int) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")


def _safe_relative(rel: str) -> bool:
    """A non-empty POSIX path that stays inside its directory: no '..', '.', empty parts or leading '/'."""
    parts = rel.split("/")
    return bool(rel) and "\\" not in rel and not PurePosixPath(rel).is_absolute() and all(
        part not in ("", ".", "..") for part in parts)


def _member(directory: str | os.PathLike, name: str, suffix: str) -> Path:
    """`<directory>/<name><suffix>` (no second suffix if `name` has it), refusing names that leave `directory`."""
    rel = name if name.endswith(suffix) else name + suffix
    if not _safe_relative(rel) or rel.rpartition("/")[2] == suffix:  # "" or "a/" would write a hidden ".json"
        raise CheckpointError(f"{name!r} is not a plain relative name (no '..', no leading '/')")
    return Path(directory) / rel


def _new_member(directory: str | os.PathLike, name: str, suffix: str) -> Path:
    path = _member(directory, name, suffix)
    if path.exists():
        raise CheckpointError(f"{path} was already written in this save: every writer needs its own name")
    with storage_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _existing_member(ckpt_dir: str | os.PathLike, name: str, suffix: str) -> Path:
    path = _member(ckpt_dir, name, suffix)
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir}: {path.relative_to(ckpt_dir)} missing from the checkpoint")
    return path


def _children(d: Path) -> list[Path]:
    try:
        return sorted(d.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _list_files(d: Path) -> set[str]:
    return {Path(dp, f).relative_to(d).as_posix() for dp, _, files in os.walk(d) for f in files}


def _hash_file(path: Path, sync: bool = False) -> tuple[int, str]:
    """(size, sha256 hex) of a file, read once; with `sync`, fsync it too."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return size, h.hexdigest()


def _map_threads(fn: Callable[[Any], _T], items: Iterable[Any]) -> list[_T]:
    """`map` on a few threads: hashlib and file reads release the GIL, so large checkpoints hash in parallel."""
    items = list(items)
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(items))) as pool:
        return list(pool.map(fn, items))


def _fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory; their renames are as durable as they get
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so readers see the old or the new content, never a mix."""
    tmp = path.parent / f"{_TMP}{path.name}-{secrets.token_hex(4)}"
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):  # best effort: a read-only filesystem keeps it until a store's startup
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _storage_reason(err: BaseException, path: Path) -> tuple[int, str] | None:
    """(errno, reason) when `err`, raised while writing `path`, means the storage refused the write;
    None for any other error. The errno comes from an OSError in the chain, else from the message
    (safetensors: "os error 28"; torch: "failed with No space left on device"), else, for an I/O
    error without one (torch's zip writer: "unexpected pos"), from the filesystem's own state."""
    chain = _exception_chain(err)
    for e in chain:
        if isinstance(e, OSError) and e.errno in _STORAGE_FIXES:
            return e.errno, _errno_text(e.errno)
    text = " ".join(str(e) for e in chain)
    for code in _STORAGE_FIXES:
        if f"os error {code})" in text or os.strerror(code) in text:
            return code, _errno_text(code)
    if isinstance(err, (OSError, RuntimeError)):
        probed = _probe_filesystem(path)
        if probed is not None:
            code, state = probed
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            name = errno.errorcode.get(code, code)
            return code, f"{os.strerror(code)} ({name}: {state}; the writer said {type(err).__name__}: {first})"
    coded = next((e for e in chain if isinstance(e, OSError) and e.errno), None)
    return (coded.errno, _errno_text(coded.errno)) if coded is not None else None


def _probe_filesystem(path: Path) -> tuple[int, str] | None:
    """(errno, what was seen) when the filesystem holding `path` refuses writes: it is mounted
    read-only, or a small test write beside `path` fails (full, over quota, I/O error); else None."""
    existing = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    directory = existing if existing.is_dir() else existing.parent
    with suppress(OSError):
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return errno.EROFS, "the filesystem is mounted read-only"
    probe = directory / f"{_TMP}probe-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = memoryview(bytes(_PROBE_BYTES))
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
    except OSError as e:
        if e.errno not in _STORAGE_FIXES:
            return None
        return e.errno, f"a {_PROBE_BYTES >> 10} KiB test write in {directory} failed too"
    finally:
        with suppress(OSError):
            probe.unlink()
    return None


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain


def _errno_text(code: int) -> str:
    return f"{os.strerror(code)} ({errno.errorcode.get(code, code)})"
