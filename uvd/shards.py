"""Sharded Parquet output: the Arrow schema of the output contract, atomic shard writes,
and readers for shards, rejects and the per-unit token cache.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uvd.records import ImageRecord, Reject

SCHEMA_VERSION = 1

SENTENCE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("task", pa.string()),
        ("num_images", pa.int32()),
        ("tokens", pa.list_(pa.uint16())),  # num_images x 256 visual ids, image after image
        ("images", pa.list_(pa.string())),  # provenance of each image
        ("meta", pa.string()),  # JSON
    ]
)

REJECT_SCHEMA = pa.schema(
    [("unit", pa.string()), ("key", pa.string()), ("reason", pa.string()), ("detail", pa.string())]
)

# The per-unit cache of tokenized images that makes runs resumable (under _work/).
UNIT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("tokens", pa.list_(pa.uint16())),
        ("hash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("meta", pa.string()),
        ("reject", pa.string()),
        ("detail", pa.string()),
    ]
)


def atomic_write_table(table: pa.Table, path: Path, **parquet_kwargs: Any) -> None:
    """Write to a temporary name in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp, **parquet_kwargs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def uint16_lists(arrays: list[np.ndarray]) -> pa.ListArray:
    """numpy token arrays -> one Arrow list<uint16> column, without a Python int per token."""
    offsets = np.cumsum([0] + [len(a) for a in arrays], dtype=np.int32)
    values = np.concatenate(arrays).astype(np.uint16) if arrays else np.zeros(0, np.uint16)
    return pa.ListArray.from_arrays(offsets, pa.array(values, pa.uint16()))


def sentences_table(rows: list[dict[str, Any]]) -> pa.Table:
    columns = {name: [r[name] for r in rows] for name in SENTENCE_SCHEMA.names if name != "tokens"}
    columns["tokens"] = uint16_lists([r["tokens"] for r in rows])
    return pa.table({name: columns[name] for name in SENTENCE_SCHEMA.names}, schema=SENTENCE_SCHEMA)


def write_shard(rows: list[dict[str, Any]], path: Path, row_group_size: int, compression: str, level: int) -> None:
    kwargs: dict[str, Any] = {"row_group_size": row_group_size, "compression": compression}
    if compression in ("zstd", "gzip"):
        kwargs["compression_level"] = level
    atomic_write_table(sentences_table(rows), path, **kwargs)


def rejects_table(rejects: Iterable[Reject]) -> pa.Table:
    rejects = list(rejects)
    return pa.table(
        {
            "unit": [r.unit for r in rejects],
            "key": [r.key for r in rejects],
            "reason": [r.reason for r in rejects],
            "detail": [r.detail for r in rejects],
        },
        schema=REJECT_SCHEMA,
    )


def write_unit_cache(path: Path, rows: dict[str, list]) -> None:
    table = pa.table(
        {
            "key": rows["key"],
            "tokens": uint16_lists(rows["tokens"]),
            "hash": rows["hash"],
            "width": pa.array(rows["width"], pa.int32()),
            "height": pa.array(rows["height"], pa.int32()),
            "meta": rows["meta"],
            "reject": rows["reject"],
            "detail": rows["detail"],
        },
        schema=UNIT_SCHEMA,
    )
    atomic_write_table(table, path, compression="zstd")


def read_unit_cache(path: Path, unit: str, max_rows: float = math.inf) -> tuple[list[ImageRecord], list[Reject], int]:
    """-> (tokenized images in reading order, rejected items, rows read): the first `max_rows` rows."""
    table = pq.read_table(path)
    if table.num_rows > max_rows:
        table = table.slice(0, int(max_rows))
    tokens = table.column("tokens").combine_chunks()
    flat = tokens.values.to_numpy(zero_copy_only=False).astype(np.uint16)
    offsets = tokens.offsets.to_numpy()
    columns = table.drop_columns(["tokens"]).to_pydict()
    images, rejects = [], []
    for i, key in enumerate(columns["key"]):
        if columns["reject"][i]:
            rejects.append(Reject(key, columns["reject"][i], columns["detail"][i], unit))
            continue
        images.append(
            ImageRecord(
                key=key,
                tokens=flat[offsets[i] : offsets[i + 1]],
                content_hash=columns["hash"][i],
                width=columns["width"][i],
                height=columns["height"][i],
                meta=json.loads(columns["meta"][i]) if columns["meta"][i] else {},
            )
        )
    return images, rejects, table.num_rows
