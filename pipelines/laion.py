"""`laion`: single-image sentences from img2dataset output, every sample accounted for.

    uvd run recipes/laion.yaml --set inputs=/data/laion --out out/laion
    uvd run recipes/laion.yaml --set 'inputs=/data/laion/{00000..00999}.tar'

Reads img2dataset's three output formats: `webdataset` (`NNNNN.tar` or `.tar.gz`),
`parquet` (`NNNNN.parquet` with the image bytes in a column) and `files` (folders `NNNNN/`
of KEY.jpg/.txt/.json); beside each shard, img2dataset's `NNNNN.parquet` gives each key's
download `status`. Tars can be streamed (`pipe:CMD`, http(s) URLs). Keys follow webdataset's
convention (the in-tar folder is part of the key). Every member and every status row becomes
exactly one item: an image, or a reject.
"""
from __future__ import annotations

import gzip
import io
import json
import logging
import math
import re
import stat
import subprocess
import tarfile
import urllib.request
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow.parquet as pq

from uvd import records as R
from uvd.images import TOO_LARGE
from uvd.records import Item, Reject, Sentence
from uvd.registry import register_source
from uvd.source import Source, UnitImages, check_unique_names, resolve_inputs

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Streamed tar shards, as webdataset names them: a shell command's output, or a URL.
STREAM_PREFIXES = ("pipe:", "http://", "https://")

# Reject reasons of this source beyond uvd.records (to be unified there by the lead).
UNSUPPORTED_MEMBER = "unsupported_member"  # a symlink, hardlink or device member, or a name with no KEY.ext
DUPLICATE_KEY = "duplicate_key"  # the key was already read from this shard; the first occurrence wins
MISSING_IMAGE = "missing_image"  # a sample (or a `success` status row) without an image member
UNKNOWN_STATUS = "unknown_status"  # a status img2dataset does not write; its image is not used
BAD_METADATA = "bad_metadata"  # the .json member is not a JSON object (null, a list, invalid JSON)
FILTERED_META = "filtered_meta"  # a `sentence.meta_filters` bound on a metadata field (named in the detail)

# img2dataset statuses: `success` and its two failures (download, resize). Others are unknown.
SUCCESS = "success"
FAILED_STATUSES = ("failed_to_download", "failed_to_resize")
# Per-sample fields of img2dataset's .json not kept in meta (the key is the item key, the rest is the status).
DROPPED_FIELDS = ("key", "status", "error_message")

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
class LaionOptions:
    keep_caption: bool = True  # store the caption in each sentence's meta (never in its pixels)
    keep_metadata: bool = True  # keep img2dataset's per-sample fields (punsafe, similarity, width, ...) in meta
    # bounds on numeric metadata fields, e.g. {punsafe: {max: 0.1}, similarity: {min: 0.28}};
    # a sample outside a bound, or without the field, is rejected as filtered_meta
    meta_filters: dict[str, dict[str, float]] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        for name, bounds in self.meta_filters.items():
            where = f"{path}.meta_filters.{name}"
            unknown = set(bounds) - {"min", "max"}
            if unknown or not bounds:
                raise ValueError(f"{where}: expected a mapping with min and/or max, got {bounds!r}")
            if not all(math.isfinite(v) for v in bounds.values()):
                raise ValueError(f"{where}: bounds must be finite numbers, got {bounds!r}")
            if "min" in bounds and "max" in bounds and bounds["min"] > bounds["max"]:
                raise ValueError(f"{where}: min {bounds['min']} is above max {bounds['max']}")


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


# ----------------------------------------------------------------------------- listing units


def expand_braces(pattern: str) -> list[str]:
    """'{00000..00002}.tar' -> ['00000.tar', '00001.tar', '00002.tar'] (webdataset's shard lists)."""
    if "{" not in pattern:
        return [pattern]
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def shard_kind(path: Path) -> str | None:
    name = path.name.lower()
    if path.is_dir():
        return "files"
    if name.endswith(TAR_SUFFIXES):
        return "tar"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def _shards_in(folder: Path) -> list[Path]:
    """img2dataset shards in an output folder: tars, folders of files, parquet files with images.
    A parquet file named like a tar or folder shard is that shard's status table, not a shard."""
    tars = [p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES)]
    dirs = [p for p in folder.iterdir() if p.is_dir() and any(_is_image_file(f) for f in p.iterdir())]
    taken = {_stem(p) for p in tars + dirs}
    parquets = [p for p in folder.glob("*.parquet") if _stem(p) not in taken and _holds_images(p)]
    return sorted(tars + dirs + parquets)


def _is_image_file(path: Path) -> bool:
    ext = split_key(path.name)[1]
    return ext is not None and ext.lower() in IMAGE_EXTENSIONS and path.is_file()


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*TAR_SUFFIXES, ".parquet"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _image_column(schema) -> str | None:
    """The binary column named like an image extension (img2dataset's parquet output), if any."""
    import pyarrow as pa

    for name in IMAGE_EXTENSIONS:
        if name in schema.names:
            kind = schema.field(name).type
            if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
                return name
    return None


def _holds_images(path: Path) -> bool:
    """A parquet file with an image column; an unreadable one is listed too (its unit is then unreadable)."""
    try:
        return _image_column(pq.read_schema(path)) is not None
    except (OSError, ValueError):
        return True


@register_source
class LaionSource(Source):
    name = "laion"
    Options = LaionOptions

    def list_units(self) -> list[str]:
        patterns = [p for pattern in self.recipe.inputs for p in expand_braces(pattern)]
        streams = [p for p in patterns if p.startswith(STREAM_PREFIXES)]
        for stream in streams:
            if not _stream_name(stream).lower().endswith(TAR_SUFFIXES):
                raise ValueError(f"inputs: {stream!r}: only tar shards (.tar, .tar.gz, .tgz) can be streamed")
        shards: list[Path | str] = list(streams)
        local = [p for p in patterns if not p.startswith(STREAM_PREFIXES)]
        for path in resolve_inputs(local) if local else []:
            if path.is_dir():
                found = _shards_in(path)
                if not found:
                    raise ValueError(
                        f"inputs: {path} holds no img2dataset shards (looked for *.tar, *.tar.gz, *.tgz, "
                        "folders of KEY.jpg files, *.parquet with an image column)"
                    )
                shards.extend(found)
            elif shard_kind(path):
                shards.append(path)
            else:
                raise ValueError(f"inputs: {path} is not a shard (.tar, .tar.gz, .tgz, .parquet or a folder)")
        check_unique_names([_stream_name(str(s)) for s in shards], "shards")
        return [str(s) for s in shards]

    # ------------------------------------------------------------------------- reading

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        streamed = unit.startswith(STREAM_PREFIXES)
        path = Path(_stream_name(unit)) if streamed else Path(unit)
        limit = self.recipe.limits.max_member_bytes
        kind = "tar" if streamed else shard_kind(path)
        status_path = path.parent / f"{_stem(path)}.parquet"
        table, table_error = None, None
        if not streamed and kind != "parquet" and status_path.is_file():
            try:
                table = read_status_table(status_path)
            except (OSError, ValueError) as err:  # pyarrow's errors are both
                table_error = f"status table {status_path.name}: {err}"
                log.warning("%s: %s; reading the shard without it", unit, table_error)
        if kind == "tar":
            samples = tar_samples(unit if streamed else path, limit)
        elif kind == "files":
            samples = folder_samples(path, limit)
        else:
            samples = parquet_samples(path, limit)
        count = 0
        for item in self._account(path.name, samples, table):
            if max_items is not None and count >= max_items:
                return
            count += 1
            yield item
        if table_error:
            raise OSError(table_error)

    def _account(self, shard: str, samples: Iterator[Sample], table: dict[str, dict] | None) -> Iterator[Item]:
        """Samples joined with the status table -> one item per sample and per status row."""
        seen: dict[str, int] = {}
        try:
            for sample in samples:
                occurrence = seen.get(sample.key, 0) + 1
                seen[sample.key] = occurrence
                if occurrence > 1:
                    yield Item(
                        f"{shard}/{sample.key}#{occurrence}", reject=DUPLICATE_KEY,
                        detail=f"key {sample.key!r} already read from this shard (occurrence {occurrence})",
                    )
                    continue
                row = table.get(sample.key) if table is not None else sample.row
                yield self._sample_item(f"{shard}/{sample.key}", sample, row)
        except ShardBroken as err:
            if err.key is not None:  # the sample being read (never yielded yet)
                occurrence = seen.get(err.key, 0) + 1
                seen[err.key] = occurrence
                key = f"{shard}/{err.key}" + (f"#{occurrence}" if occurrence > 1 else "")
                yield Item(key, reject=R.UNREADABLE, detail=f"the shard breaks inside this sample: {err}"[:300])
            for key in table or {}:
                if key not in seen:
                    yield Item(f"{shard}/{key}", reject=R.UNREADABLE, detail="not reached: the shard breaks before it")
            raise
        for key, row in (table or {}).items():
            if key not in seen:
                yield _status_only_item(f"{shard}/{key}", shard, row)

    def _sample_item(self, key: str, sample: Sample, row: dict | None) -> Item:
        if sample.problem:
            return Item(key, reject=sample.problem[0], detail=sample.problem[1][:300])
        status = row.get("status", SUCCESS) if row is not None else SUCCESS
        if status in FAILED_STATUSES:
            return Item(key, reject=R.DOWNLOAD_FAILED, detail=f"{status}: {row.get('error_message') or ''}"[:300])
        if status != SUCCESS:
            detail = f"status {status!r} is not one img2dataset writes; image not used"
            return Item(key, reject=UNKNOWN_STATUS, detail=detail)
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample.members), None)
        if image_ext is None:
            return Item(key, reject=MISSING_IMAGE, detail=f"no image member among {sorted(sample.members)}")
        info: dict[str, Any] = {}
        if "json" in sample.members:
            try:
                info = parse_metadata(sample.members["json"])
            except ValueError as err:
                return Item(key, reject=BAD_METADATA, detail=str(err)[:300])
        elif row is not None:
            info = dict(row)
        meta = self._meta(info, sample.members.get("txt"))
        for name, bounds in self.options.meta_filters.items():
            failure = _check_bound(name, info.get(name), bounds)
            if failure:
                return Item(key, reject=FILTERED_META, detail=failure)
        return Item(key, data=sample.members[image_ext], meta=meta)

    def _meta(self, info: dict[str, Any], txt: bytes | None) -> dict[str, Any]:
        if self.options.keep_metadata:
            meta = {k: v for k, v in info.items() if k not in DROPPED_FIELDS}
        else:
            meta = {"url": info.get("url")}
            if "metadata_encoding" in info:
                meta["metadata_encoding"] = info["metadata_encoding"]
        meta.setdefault("url", None)
        if self.options.keep_caption:
            meta["caption"] = txt.decode("utf-8", "replace") if txt is not None else info.get("caption")
        else:
            meta.pop("caption", None)
        return meta

    def assemble(self, units: Iterable[UnitImages]) -> Iterator[Sentence | Reject]:
        for unit in units:
            for image in unit.images:
                yield Sentence("single", [image], meta=dict(image.meta))


def _status_only_item(key: str, shard: str, row: dict) -> Item:
    """A status row whose key has no sample in the shard."""
    status = row.get("status", SUCCESS)
    if status in FAILED_STATUSES:
        return Item(key, reject=R.DOWNLOAD_FAILED, detail=f"{row.get('error_message') or status}"[:300])
    if status == SUCCESS:
        return Item(key, reject=MISSING_IMAGE, detail=f"status success, but no sample with this key in {shard}")
    return Item(key, reject=UNKNOWN_STATUS, detail=f"status {status!r} is not one img2dataset writes")


def _check_bound(name: str, value: Any, bounds: dict[str, float]) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{name}: no numeric value ({value!r}) to check against {bounds}"
    if "min" in bounds and value < bounds["min"]:
        return f"{name}={value} below min {bounds['min']}"
    if "max" in bounds and value > bounds["max"]:
        return f"{name}={value} above max {bounds['max']}"
    return None


def parse_metadata(data: bytes) -> dict[str, Any]:
    """A .json member -> its object. UTF-8 as img2dataset writes it; a member that is not UTF-8
    is read as latin-1 (recorded as `metadata_encoding`); anything but a JSON object is a ValueError."""
    encoding = "utf-8"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text, encoding = data.decode("latin-1"), "latin-1"
    try:
        value = json.loads(text)
    except ValueError as err:
        raise ValueError(f".json member is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise ValueError(f".json member holds {type(value).__name__}, not an object")
    if encoding != "utf-8":
        value["metadata_encoding"] = encoding
    return value


def read_status_table(path: Path) -> dict[str, dict[str, Any]]:
    """img2dataset's per-shard parquet -> {key: row} (image columns left out). Without a `status`
    column every row counts as a success; without a `key` column the table cannot be joined."""
    schema = pq.read_schema(path)
    if "key" not in schema.names:
        raise ValueError("no `key` column to join on")
    image = _image_column(schema)
    columns = [n for n in schema.names if n != image and n not in IMAGE_EXTENSIONS]
    rows = pq.read_table(path, columns=columns).to_pylist()
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row["key"]
        if key is None:
            continue
        table.setdefault(str(key), _jsonable(row))  # a repeated key: the first row wins
    return table


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
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


def _stream_name(unit: str) -> str:
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
    """A binary stream of a shard: a local file, `pipe:CMD` (CMD's standard output, as webdataset's
    gopen) or an http(s) URL. A command that exits non-zero after a full read is an OSError."""
    if isinstance(unit, Path) or not unit.startswith(STREAM_PREFIXES):
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
    name = _stream_name(str(path))
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
                            yield Sample(info.name, problem=(UNSUPPORTED_MEMBER, f"member {info.name!r} has no KEY.ext name"))
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
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        info = path.lstat()
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
        parquet = pq.ParquetFile(path)
        image = _image_column(parquet.schema_arrow)
        index = 0
        for batch in parquet.iter_batches(batch_size=batch_rows):
            for row in batch.to_pylist():
                key = row.get("key")
                key = str(key) if key is not None else f"row{index:09d}"
                index += 1
                data = row.pop(image, None) if image else None
                txt = row.pop("txt", None)
                sample = Sample(key, row=_jsonable(row))
                if data is not None and len(data) > max_member_bytes:
                    sample.problem = (TOO_LARGE, f"{len(data)} bytes over limits.max_member_bytes={max_member_bytes}")
                elif data is not None:
                    sample.members[image] = data
                if txt is not None:
                    sample.members["txt"] = txt.encode() if isinstance(txt, str) else bytes(txt)
                yield sample
    except (OSError, ValueError) as err:  # a damaged parquet file (pyarrow raises both)
        raise ShardBroken(f"{path.name}: {err}") from err
