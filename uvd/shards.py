"""Parquet tables of a run: the Arrow schema of the output contract (shards), of the rejects,
and of phase 1's per-part work files; turning rows into tables and tables into file bytes.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uvd.records import Reject

SCHEMA_VERSION = 2  # 2: shards under data/, rejects under rejects/, records under _uvd/

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

# Phase 1's output per part (under _uvd/work/): every item read, tokenized or rejected, in order.
WORK_SCHEMA = pa.schema(
    [
        ("ordinal", pa.int32()),  # position of the item in its part (input order)
        ("unit", pa.int32()),  # global index of its unit
        ("key", pa.string()),
        ("tokens", pa.list_(pa.uint16())),  # empty for rejects
        ("digest", pa.binary(16)),  # content hash (first 16 bytes of sha256); null for rejects
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


def table_bytes(table: pa.Table, **parquet_kwargs: Any) -> bytes:
    """A table as Parquet file bytes (so size and checksum are known before the file is placed)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **parquet_kwargs)
    return sink.getvalue().to_pybytes()


def shard_kwargs(row_group_size: int, compression: str, level: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"row_group_size": row_group_size, "compression": compression}
    if compression in ("zstd", "gzip"):
        kwargs["compression_level"] = level
    return kwargs
