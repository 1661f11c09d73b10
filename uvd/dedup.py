"""Exact deduplication as a distributed step: the first occurrence in input order wins.

Phase 1 writes, per part, the content digests of its kept images sorted by bucket (the first
two digest bytes). Each dedup task takes a range of buckets, reads only those rows of every
part's digest file (row-group statistics skip the rest), sorts them by (digest, part, ordinal)
and writes the losers — `_uvd/plan/dups-<task>.parquet` (part, ordinal, unit, winner key),
sorted by part so each writer reads only its own. Memory per task is bounded by the rows in its
bucket range, never by the dataset.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uvd import layout as L
from uvd.shards import table_bytes
from uvd.work import DIGEST_BUCKETS

ROWS_PER_TASK = 4_000_000  # ~250 MB of (digest, part, ordinal, key) per dedup task


def bucket_ranges(num_kept: int) -> list[tuple[int, int]]:
    """Contiguous bucket ranges, one per dedup task, sized so each holds ~ROWS_PER_TASK rows."""
    tasks = max(1, min(DIGEST_BUCKETS, math.ceil(num_kept / ROWS_PER_TASK)))
    edges = np.linspace(0, DIGEST_BUCKETS, tasks + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def find_duplicates(table: pa.Table) -> pa.Table:
    """Rows (bucket, digest, part, ordinal, unit, key) -> the losers (part, ordinal, unit, winner),
    sorted by (part, ordinal): for each digest, every row after the first in (part, ordinal) order."""
    n = table.num_rows
    if n == 0:
        return pa.table({"part": pa.array([], pa.int32()), "ordinal": pa.array([], pa.int32()),
                         "unit": pa.array([], pa.int32()), "winner": pa.array([], pa.string())})
    digests = table.column("digest").combine_chunks()
    raw = np.frombuffer(digests.buffers()[1], dtype=">u8", count=2 * (digests.offset + n))[2 * digests.offset:]
    hi, lo = raw[0::2].astype(np.uint64), raw[1::2].astype(np.uint64)
    part = table.column("part").to_numpy()
    ordinal = table.column("ordinal").to_numpy()
    order = np.lexsort((ordinal, part, lo, hi))  # last key sorts first
    hi, lo = hi[order], lo[order]
    first = np.ones(n, bool)
    first[1:] = (hi[1:] != hi[:-1]) | (lo[1:] != lo[:-1])
    winner_pos = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    losers = np.flatnonzero(~first)
    keys = table.column("key").to_numpy(zero_copy_only=False)
    rows = order[losers]
    result = pa.table({
        "part": pa.array(part[rows], pa.int32()),
        "ordinal": pa.array(ordinal[rows], pa.int32()),
        "unit": pa.array(table.column("unit").to_numpy()[rows], pa.int32()),
        "winner": pa.array(keys[order[winner_pos[losers]]], pa.string()),
    })
    return result.sort_by([("part", "ascending"), ("ordinal", "ascending")])


def dedup_task(run_dir: str, num_parts: int, task: int, lo: int, hi: int) -> int:
    """Ray task body: the losers among buckets [lo, hi) of every part; -> how many."""
    run = Path(run_dir)
    table = pa.concat_tables([  # a run has at least one part
        pq.read_table(run / L.WORK_DIR / f"{L.part_name(part)}.digests.parquet",
                      filters=[("bucket", ">=", lo), ("bucket", "<", hi)])
        for part in range(num_parts)
    ])
    losers = find_duplicates(table)
    L.atomic_write_bytes(run / L.PLAN_DIR / f"dups-{task:05d}.parquet", table_bytes(losers, row_group_size=8192))
    return losers.num_rows


def losers_per_unit(run: Path) -> dict[int, int]:
    """unit index -> images dedup rejected in it (for planners that count kept images)."""
    counts: dict[int, int] = {}
    for path in sorted((run / L.PLAN_DIR).glob("dups-*.parquet")):
        units, n = np.unique(pq.read_table(path, columns=["unit"]).column("unit").to_numpy(), return_counts=True)
        for u, c in zip(units.tolist(), n.tolist()):
            counts[u] = counts.get(u, 0) + c
    return counts
