"""`laion`: single-image sentences from img2dataset output, every sample accounted for.

    uvd run recipes/laion.yaml --set inputs=/data/laion --out out/laion
    uvd run recipes/laion.yaml --set 'inputs=/data/laion/{00000..00999}.tar'

Reads img2dataset's three output formats: `webdataset` (`NNNNN.tar` or `.tar.gz`),
`parquet` (`NNNNN.parquet` with the image bytes in a column) and `files` (folders `NNNNN/`
of KEY.jpg/.txt/.json); beside each shard, img2dataset's `NNNNN.parquet` gives each key's
download `status`. Inputs may be local or in an object store (`s3://bucket/laion/`,
`gs://.../{00000..00099}.tar`, `hf://datasets/...`, globs too; read through fsspec, streamed
member by member). Tars can also be streamed from `pipe:CMD` and http(s) URLs. Keys follow webdataset's
convention (the in-tar folder is part of the key). Every member and every status row becomes
exactly one item: an image, or a reject.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from uvd.pipelines.laion_shards import (  # noqa: F401  (UNSUPPORTED_MEMBER: a reason this source gives, via the readers)
    IMAGE_EXTENSIONS, STREAM_PREFIXES, TAR_SUFFIXES, UNSUPPORTED_MEMBER, Sample, ShardBroken, folder_samples,
    image_column, jsonable, parquet_samples, split_key, stream_name, tar_samples,
)
from uvd import records as R
from uvd import storage as S
from uvd.records import Item, Reject, Sentence
from uvd.registry import register_source
from uvd.source import Source, UnitImages, check_unique_names, limit_items, resolve_inputs

log = logging.getLogger(__name__)

# Reject reasons of this source (the shard readers add unsupported_member, too_large).
DUPLICATE_KEY = R.DUPLICATE_KEY  # the key was already read from this shard; the first occurrence wins
MISSING_IMAGE = R.MISSING_IMAGE  # a sample (or a `success` status row) without an image member
UNKNOWN_STATUS = R.reason("unknown_status", "a status img2dataset does not write; its image is not used")
BAD_METADATA = R.reason("bad_metadata", "a sample whose .json member is not a JSON object (null, a list, invalid JSON)")
FILTERED_META = R.reason("filtered_meta", "a sentence.meta_filters bound on a metadata field (named in the detail) fails")

# img2dataset statuses: `success` and its two failures (download, resize). Others are unknown.
SUCCESS = "success"
FAILED_STATUSES = ("failed_to_download", "failed_to_resize")
# Per-sample fields of img2dataset's .json not kept in meta: the key is the item key, status and error
# are the download's, and `exif` is img2dataset's dump of the raw EXIF tags (often KBs per image; the
# orientation is read from the image itself).
DROPPED_FIELDS = ("key", "status", "error_message", "exif")


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
    entries = list(folder.iterdir())
    tars = [p for p in entries if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES)]
    dirs = [p for p in entries if p.is_dir() and any(_is_image_file(f) for f in p.iterdir())]
    taken = {_stem(p) for p in tars + dirs}
    parquets = [p for p in entries if p.name.endswith(".parquet") and _stem(p) not in taken and _holds_images(p)]
    return sorted(tars + dirs + parquets, key=str)


def _is_image_file(path: Path) -> bool:
    ext = split_key(path.name)[1]
    return ext is not None and ext.lower() in IMAGE_EXTENSIONS and path.is_file()


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (*TAR_SUFFIXES, ".parquet"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _holds_images(path: Path) -> bool:
    """A parquet file with an image column; an unreadable one is listed too (its unit is then unreadable)."""
    try:
        return image_column(S.read_schema(path)) is not None
    except (OSError, ValueError):
        return True


@register_source
class LaionSource(Source):
    name = "laion"
    Options = LaionOptions
    units_per_part = 1
    input_hint = "img2dataset shards *.tar"

    def list_units(self) -> list[str]:
        patterns = [p for pattern in self.recipe.inputs for p in expand_braces(pattern)]
        streams = [p for p in patterns if p.startswith(STREAM_PREFIXES)]
        for stream in streams:
            if not stream_name(stream).lower().endswith(TAR_SUFFIXES):
                raise ValueError(f"inputs: {stream!r}: only tar shards (.tar, .tar.gz, .tgz) can be streamed")
        shards: list[Path | str] = list(streams)
        local = [p for p in patterns if not p.startswith(STREAM_PREFIXES) and not S.is_uri(p)]
        stored = [p for p in patterns if not p.startswith(STREAM_PREFIXES) and S.is_uri(p)]
        for pattern in stored:  # object stores: listed through fsspec
            if not S.expand(pattern):
                raise ValueError(f"inputs: {pattern!r} matches nothing")
        for path in [*(resolve_inputs(local) if local else []), *(p for pattern in stored for p in S.expand(pattern))]:
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
        check_unique_names([stream_name(str(s)) for s in shards], "shards")
        return [str(s) for s in shards]

    # ------------------------------------------------------------------------- reading

    def read_unit(self, unit: str, max_items: int | None = None) -> Iterator[Item]:
        streamed = unit.startswith(STREAM_PREFIXES)
        path = Path(stream_name(unit)) if streamed else S.as_path(unit)
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
        yield from limit_items(self._account(path.name, samples, table, table_error), max_items)

    def _account(self, shard: str, samples: Iterator[Sample], table: dict[str, dict] | None,
                 table_error: str | None = None) -> Iterator[Item]:
        """Samples joined with the status table -> one item per sample and per status row; then an
        unreadable status table fails the unit (OSError), once its samples are all accounted for."""
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
        if table_error:
            raise OSError(table_error)

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
    schema = S.read_schema(path)
    if "key" not in schema.names:
        raise ValueError("no `key` column to join on")
    image = image_column(schema)
    columns = [n for n in schema.names if n != image and n not in IMAGE_EXTENSIONS]
    rows = S.read_table(path, columns=columns).to_pylist()
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        key = row["key"]
        if key is None:
            continue
        table.setdefault(str(key), jsonable(row))  # a repeated key: the first row wins
    return table


