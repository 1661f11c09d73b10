"""The run folder: where each file lives, which names UVD writes, and the rules that keep a
user's files safe.

    RUN/README.md                       dataset card (Hugging Face `configs:` for shards and rejects)
    RUN/_manifest.json                  identity, status, totals; the shard index once complete
    RUN/_recipe.yaml                    the resolved recipe
    RUN/data/<source>-<part>-<k>.parquet    shards (one row per sentence)
    RUN/rejects/<source>-<part>.parquet     every rejected input of that part, with its reason
    RUN/labels/<source>-<part>.parquet      raw labeler outputs (only with `labelers.save: true`)
    RUN/_uvd/                           bookkeeping: lock, per-part records, token work files

RUN is a local folder or an object-store URI (s3://, gs://, hf://; uvd/storage.py): the same
names, the same commit protocol (each file placed whole, each part's record written last).
Every name read back from disk is checked against these patterns and must stay inside the run
folder, so a tampered manifest can never make UVD touch a file it did not write.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path, PurePosixPath
from typing import Any

from uvd import storage as S

MANIFEST = "_manifest.json"
RECIPE_FILE = "_recipe.yaml"
CARD_FILE = "README.md"
DATA_DIR = "data"
REJECTS_DIR = "rejects"
LABELS_DIR = "labels"
META_DIR = "_uvd"
LOCK_FILE = f"{META_DIR}/lock"
PARTS_DIR = f"{META_DIR}/parts"  # phase 1 records: <part>.json, one per tokenized part
WRITES_DIR = f"{META_DIR}/writes"  # phase 2 records: <part>.json, one per written part
WORK_DIR = f"{META_DIR}/work"  # phase 1 outputs: <part>.parquet (tokens), <part>.digests.parquet
PLAN_DIR = f"{META_DIR}/plan"  # cross-part plans and dedup decisions
CARD_MARKER = "<!-- written by uvd -->"

_SHARD_NAME = re.compile(r"data/[a-z][a-z0-9_]*-\d{6}-\d{3}\.parquet")
_REJECTS_NAME = re.compile(r"rejects/[a-z][a-z0-9_]*-\d{6}\.parquet")
_LABELS_NAME = re.compile(r"labels/[a-z][a-z0-9_]*-\d{6}\.parquet")
_PATTERNS = {DATA_DIR: _SHARD_NAME, REJECTS_DIR: _REJECTS_NAME, LABELS_DIR: _LABELS_NAME}
# Files a run folder may hold (for deciding whether a folder is "ours" before writing into it).
_OWN_TOP = {MANIFEST, RECIPE_FILE, CARD_FILE, DATA_DIR, REJECTS_DIR, LABELS_DIR, META_DIR}


def part_name(index: int) -> str:
    return f"{index:06d}"


def shard_name(source: str, part: int, k: int) -> str:
    return f"{DATA_DIR}/{source}-{part_name(part)}-{k:03d}.parquet"


def rejects_name(source: str, part: int) -> str:
    return f"{REJECTS_DIR}/{source}-{part_name(part)}.parquet"


def labels_name(source: str, part: int) -> str:
    return f"{LABELS_DIR}/{source}-{part_name(part)}.parquet"


def checked_name(run_dir: Path, name: str, kind: str) -> Path:
    """A shard or rejects name read from disk -> its path; refuses anything not shaped like a
    name UVD writes (`..`, absolute paths, other folders), so it can never leave the run folder."""
    pattern = _SHARD_NAME if kind == "shard" else _REJECTS_NAME
    if not isinstance(name, str) or not pattern.fullmatch(name) or PurePosixPath(name).is_absolute():
        raise ValueError(f"{S.as_path(run_dir) / MANIFEST}: {name!r} is not a {kind} name UVD writes; refusing to use it")
    return S.as_path(run_dir) / name


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Never half a file: locally written under a temporary name in the same folder, then renamed;
    on an object store one PUT of the whole object (uvd/storage.py)."""
    try:
        S.put_bytes(path, data)
    except OSError as err:
        raise disk_error(err, path) from err


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())


def read_json(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON record, or None when absent; a damaged one is a clear error naming the file."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptRunError(path, f"{what} is damaged ({err})") from None
    if not isinstance(data, dict):
        raise CorruptRunError(path, f"{what} is not a JSON object")
    return data


class CorruptRunError(ValueError):
    def __init__(self, path: Path, problem: str):
        super().__init__(
            f"{path}: {problem}. Rerun with --overwrite to start this run over (it deletes only files UVD wrote), "
            "or restore the file."
        )
        self.path = path


class DiskFullError(RuntimeError):
    """Writing failed for lack of space; what was finished stays valid and a rerun resumes."""


def disk_error(err: OSError, path: Path) -> Exception:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on the device writing {path}; free some space and run the same "
                             "command again: finished parts are kept and the run resumes")
    return err


# ---------------------------------------------------------------- is this folder ours?


def foreign_entries(run_dir: Path) -> list[str]:
    """Entries of `run_dir` UVD did not write (so it must not write there)."""
    if not run_dir.is_dir():
        return []
    foreign = []
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if name not in _OWN_TOP and not (name.startswith(".") and name.endswith(".tmp")):
            foreign.append(name)
        elif name in _PATTERNS and entry.is_dir():
            foreign += [f"{name}/{p.name}" for p in entry.iterdir()
                        if not _PATTERNS[name].fullmatch(f"{name}/{p.name}") and not p.name.endswith(".tmp")]
        elif name == CARD_FILE and CARD_MARKER not in entry.read_text(errors="replace")[:4000]:
            foreign.append(name)
    return foreign


def check_out_dir(run_dir: Path) -> None:
    """Refuse an --out that is a file, or a folder holding anything UVD did not write."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"--out {run_dir}: is an existing file, not a folder; choose another --out")
    foreign = foreign_entries(run_dir)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ValueError(f"--out {run_dir}: holds files UVD did not write ({shown}); UVD writes only into an empty "
                         "folder or a run of its own. Choose another --out (nothing was changed).")


def clear_run(run_dir: Path) -> int:
    """Delete what UVD wrote in `run_dir` (for --overwrite), and nothing else: only names that
    match UVD's own patterns, only inside the folder. -> files deleted."""
    check_out_dir(run_dir)  # a folder with foreign files is never cleared
    remote = S.is_remote(run_dir)
    count = 0
    for sub, pattern in _PATTERNS.items():
        folder = run_dir / sub
        if folder.is_dir() and (remote or not folder.is_symlink()):
            for path in folder.iterdir():
                if (pattern.fullmatch(f"{sub}/{path.name}") or path.name.endswith(".tmp")) and path.is_file():
                    path.unlink()
                    count += 1
            if not remote and not any(folder.iterdir()):  # an object store has no empty folders
                folder.rmdir()
    meta = run_dir / META_DIR
    if meta.is_dir() and (remote or not meta.is_symlink()):
        count += sum(1 for p in meta.rglob("*") if p.is_file())
        S.remove_tree(meta)
    for name in (MANIFEST, RECIPE_FILE, CARD_FILE):
        path = run_dir / name
        if path.is_file() and (remote or not path.is_symlink()):
            path.unlink()
            count += 1
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink()
    return count


# ---------------------------------------------------------------- one writer at a time


class RunLock:
    """An exclusive lock on a run folder for the driver's lifetime (fcntl: released by the kernel
    when the process dies, so a killed run never leaves a stale lock)."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.fd: int | None = None
        self.remote = S.ObjectLock(self.path, str(run_dir)) if S.is_remote(run_dir) else None

    def __enter__(self) -> "RunLock":
        if self.remote is not None:  # an object store: a conditional PUT with a heartbeat
            self.remote.__enter__()
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ValueError(f"--out {self.path.parents[1]}: another `uvd run` is writing this folder ({holder}); "
                             "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.remote is not None:
            self.remote.__exit__(*exc)
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
