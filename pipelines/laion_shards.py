"""Reading img2dataset shards member by member: tar (local or in an object store, .tar.gz,
`pipe:`, http), folders of files, parquet with image bytes. Each yields `Sample`s in shard order, one per key, keeping
every member's fate (links, oversize members, a shard cut short) for `pipelines/laion.py`.
"""
from __future__ import annotations

import gzip
import io
import re
import stat
import subprocess
import tarfile
import urllib.request
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from uvd import storage as S
from uvd.records import TOO_LARGE, reason
from uvd.source import IMAGE_SUFFIXES

IMAGE_EXTENSIONS = tuple(s.lstrip(".") for s in IMAGE_SUFFIXES)  # webdataset member names: no dot
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Streamed tar shards, as webdataset names them: a shell command's output, or a URL.
STREAM_PREFIXES = ("pipe:", "http://", "https://")

# Reject reason of the readers beyond uvd.records (to be unified there by the lead).
UNSUPPORTED_MEMBER = reason("unsupported_member", "a tar member that is a link or device, or whose name is not KEY.ext")

# webdataset's key convention (webdataset.tariterators.base_plus_ext): the key is the member path
# up to the first dot of its file name, folders included; the rest is the extension.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
# webdataset skips its own metadata members (`__meta__`, `__index__/...`); so do we.
_WDS_META = re.compile(r"__[^/]*__($|/)")


def split_key(name: str) -> tuple[str | None, str | None]:
    """'a/b/000012.jpg' -> ('a/b/000012', 'jpg'), as webdataset's base_plus_ext; (None, None) if none."""
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2)) if match else (None, None)


@dataclass
class Sample:
    """One key's members as read from a shard; `problem` is (reason, detail) when one is unusable."""

    key: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: tuple[str, str] | None = None
    row: dict[str, Any] | None = None  # the parquet output format's row (its metadata)


class ShardBroken(OSError):
    """A shard that cannot be read to its end; `key` is the sample being read when it broke."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def image_column(schema) -> str | None:
    """The binary column named like an image extension (img2dataset's parquet output), if any."""
    import pyarrow as pa

    for name in IMAGE_EXTENSIONS:
        if name in schema.names:
            kind = schema.field(name).type
            if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
                return name
    return None


def jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None), list, dict)) else str(v)) for k, v in row.items()}


# ----------------------------------------------------------------------------- tar shards


class _CountingReader(io.RawIOBase):
    """Reads through `raw`, counting bytes and remembering where the last non-zero byte was,
    so the end of a tar can be checked (tarfile silently stops at a cut header)."""

    def __init__(self, raw):
        self.raw, self.count, self.last_nonzero = raw, 0, -1

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        kept = len(data.rstrip(b"\0"))
        if kept:
            self.last_nonzero = self.count + kept - 1
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def stream_name(unit: str) -> str:
    """The shard's file name in a unit: the last word of a pipe: command naming a tar (else its
    last word), the last part of a URL."""
    if unit.startswith("pipe:"):
        names = [Path(w.strip("'\";|&")).name for w in unit[5:].split()] or [unit]
        return next((n for n in reversed(names) if n.lower().endswith(TAR_SUFFIXES)), names[-1])
    if unit.startswith(STREAM_PREFIXES):
        return unit.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return Path(unit).name


@contextmanager
def open_shard(unit: str | Path):
    """A binary stream of a shard: a local file, an object in a store (s3://, gs://, hf://: a path
    of uvd.storage, streamed), `pipe:CMD` (CMD's standard output, as webdataset's gopen) or an
    http(s) URL. A command that exits non-zero after a full read is an OSError."""
    if not isinstance(unit, str):  # a local or object-store path
        with unit.open("rb") as f:
            yield f
        return
    if not unit.startswith(STREAM_PREFIXES):
        with open(unit, "rb") as f:
            yield f
        return
    if unit.startswith("pipe:"):
        proc = subprocess.Popen(unit[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        finished = False
        try:
            yield proc.stdout
            finished = True
        finally:
            if not finished:  # the reader stopped early (max_items) or failed: do not wait for the command
                proc.kill()
            error = proc.stderr.read()[-300:].decode("utf-8", "replace").strip()
            proc.stdout.close(), proc.stderr.close()
            code = proc.wait()
        if finished and code != 0:
            raise OSError(f"{unit!r} exited with status {code}: {error}")
        return
    with urllib.request.urlopen(unit, timeout=60) as response:
        yield response


def tar_samples(path: Path | str, max_member_bytes: int) -> Iterator[Sample]:
    """Consecutive members with the same key -> one `Sample`, streaming (one sample in memory).

    Unlike webdataset's tar_file_iterator + group_by_keys, which skip links silently, read every
    member whole before anyone can check its size, and raise on a repeated key, this keeps each
    member's fate: links and specials are `unsupported_member`, members over `max_member_bytes`
    are `too_large` (skipped unread), and a repeated key becomes a second sample."""
    name = stream_name(str(path))
    compressed = name.lower().endswith((".tar.gz", ".tgz"))
    current: Sample | None = None
    try:
        with open_shard(path) as raw:
            stream = _CountingReader(gzip.GzipFile(fileobj=raw) if compressed else raw)
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for info in tar:
                        if info.isdir() or _WDS_META.match(info.name):
                            continue
                        key, ext = split_key(info.name)
                        if key is None or key.rsplit("/", 1)[-1].startswith("."):
                            # no KEY.ext (or a hidden file): an item of its own, rejected
                            if current is not None:
                                yield current
                            current = None
                            problem = (UNSUPPORTED_MEMBER, f"member {info.name!r} has no KEY.ext name")
                            yield Sample(info.name, problem=problem)
                            continue
                        ext = ext.lower()
                        if current is None or key != current.key or ext in current.members:
                            if current is not None:
                                yield current
                            current = Sample(key)
                        problem = _member_problem(info, max_member_bytes)
                        if problem:
                            current.problem = current.problem or problem
                            current.members[ext] = b""
                            continue
                        current.members[ext] = tar.extractfile(info).read()
                    end = tar.offset
                stream.drain()
            except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
                raise ShardBroken(f"{name}: {type(err).__name__}: {err}", current.key if current else None) from err
            problem = _tar_end_problem(stream, end)
            if problem:
                raise ShardBroken(f"{name}: {problem}", current.key if current else None)
    except ShardBroken:
        raise
    except OSError as err:  # the shard could not be opened, or its command failed after a full read
        raise ShardBroken(f"{name}: {err}", current.key if current else None) from err
    if current is not None:
        yield current


def _member_problem(info: tarfile.TarInfo, max_member_bytes: int) -> tuple[str, str] | None:
    if info.issym():
        return UNSUPPORTED_MEMBER, f"{info.name} is a symbolic link to {info.linkname!r}"
    if info.islnk():
        return UNSUPPORTED_MEMBER, f"{info.name} is a hard link to {info.linkname!r}"
    if not info.isreg():
        return UNSUPPORTED_MEMBER, f"{info.name} is not a regular file (tar type {info.type!r})"
    if info.size > max_member_bytes:
        return TOO_LARGE, f"{info.name}: {info.size} bytes over limits.max_member_bytes={max_member_bytes}"
    return None


def _tar_end_problem(stream: _CountingReader, end: int) -> str | None:
    """A whole tar ends with zero blocks after its last member; tarfile stops quietly without them."""
    if stream.count < end + tarfile.BLOCKSIZE:
        return f"cut short: {stream.count} bytes, no end-of-archive block after byte {end}"
    if stream.last_nonzero >= end:
        return f"data after the end-of-archive block at byte {end} (concatenated or damaged tar): not read"
    return None


# ----------------------------------------------------------------------------- files and parquet shards


def folder_samples(folder: Path, max_member_bytes: int) -> Iterator[Sample]:
    """img2dataset's `files` format: KEY.jpg / KEY.txt / KEY.json in one folder (sorted by name)."""
    current: Sample | None = None
    remote = S.is_remote(folder)
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        info = path.stat() if remote else path.lstat()  # an object store has no links
        if stat.S_ISDIR(info.st_mode):
            continue
        key, ext = split_key(path.name)
        if key is None or key.startswith("."):
            if current is not None:
                yield current
            current = None
            yield Sample(path.name, problem=(UNSUPPORTED_MEMBER, f"file {path.name!r} has no KEY.ext name"))
            continue
        ext = ext.lower()
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = Sample(key)
        if stat.S_ISLNK(info.st_mode):
            current.problem = current.problem or (UNSUPPORTED_MEMBER, f"{path.name} is a symbolic link")
        elif not stat.S_ISREG(info.st_mode):
            current.problem = current.problem or (UNSUPPORTED_MEMBER, f"{path.name} is not a regular file")
        elif info.st_size > max_member_bytes:
            current.problem = current.problem or (
                TOO_LARGE, f"{path.name}: {info.st_size} bytes over limits.max_member_bytes={max_member_bytes}"
            )
        else:
            current.members[ext] = path.read_bytes()
            continue
        current.members[ext] = b""
    if current is not None:
        yield current


def parquet_samples(path: Path, max_member_bytes: int, batch_rows: int = 64) -> Iterator[Sample]:
    """img2dataset's `parquet` format: one row per sample, the image bytes in a column named by
    its extension (jpg, png, webp), the caption in `txt`, metadata in the other columns."""
    try:
        parquet = S.parquet_file(path)
        image = image_column(parquet.schema_arrow)
        index = 0
        for batch in parquet.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                key = row.get("key")
                key = str(key) if key is not None else f"row{index:09d}"
                index += 1
                data = row.pop(image, None) if image else None
                txt = row.pop("txt", None)
                sample = Sample(key, row=jsonable(row))
                if data is not None and len(data) > max_member_bytes:
                    sample.problem = (TOO_LARGE, f"{len(data)} bytes over limits.max_member_bytes={max_member_bytes}")
                elif data is not None:
                    sample.members[image] = data
                if txt is not None:
                    sample.members["txt"] = txt.encode() if isinstance(txt, str) else bytes(txt)
                yield sample
    except (OSError, ValueError) as err:  # a damaged parquet file (pyarrow raises both)
        raise ShardBroken(f"{path.name}: {err}") from err
