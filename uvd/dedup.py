"""Exact deduplication as a distributed step: the first occurrence in input order wins.

Phase 1 writes, per part, the content digests of its kept images sorted by bucket (the first
two digest bytes). Dedup then runs in two rounds of Ray tasks, so that no task opens every
part's file (at UVDv1 size, 164k parts x 410 bucket ranges would be 67M reads from an object
store):

1. **Gather**: consecutive parts are grouped to about ROWS_PER_TASK digests; one task per group
   reads its parts' digest files and writes `_uvd/plan/gather-<group>.parquet`, sorted by bucket,
   one row group per bucket range.
2. **Decide**: one task per bucket range reads its row group of every gather file (row-group
   statistics skip the rest), sorts by (digest, part, ordinal) and writes the losers —
   `_uvd/plan/dups-<task>.parquet` (part, ordinal, unit, winner key), sorted by part so each
   writer reads only its own.

Reads: P part files, then G x T row groups (G groups, T ranges, both about N / ROWS_PER_TASK):
at UVDv1 size 164k + 410 x 410 = 0.3M reads instead of 67M. The gather files are deleted once the
decisions are written. Memory per task is bounded by ~ROWS_PER_TASK rows, never by the dataset.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from uvd import layout as L
from uvd import storage as S
from uvd.shards import table_bytes
from uvd.work import DIGEST_BUCKETS

ROWS_PER_TASK = 4_000_000  # ~250 MB of (digest, part, ordinal, key) per dedup task


def bucket_ranges(num_kept: int, rows_per_task: int = ROWS_PER_TASK) -> list[tuple[int, int]]:
    """Contiguous bucket ranges, one per dedup task, sized so each holds ~rows_per_task rows."""
    tasks = max(1, min(DIGEST_BUCKETS, math.ceil(num_kept / rows_per_task)))
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


def part_groups(kept_per_part: list[int], rows_per_task: int = ROWS_PER_TASK) -> list[tuple[int, int]]:
    """Consecutive part ranges [first, end), each closed once it holds `rows_per_task` digests."""
    groups, first, rows = [], 0, 0
    for part, kept in enumerate(kept_per_part):
        rows += kept
        if rows >= rows_per_task:
            groups.append((first, part + 1))
            first, rows = part + 1, 0
    if first < len(kept_per_part) or not groups:
        groups.append((first, len(kept_per_part)))
    return groups


def gather_task(run_dir: str, group: int, first: int, end: int, ranges: list[tuple[int, int]]) -> int:
    """Ray task body: the digests of parts [first, end) -> one file, one row group per bucket range."""
    run = S.as_path(run_dir)
    table = pa.concat_tables([S.read_table(run / L.WORK_DIR / f"{L.part_name(part)}.digests.parquet")
                              for part in range(first, end)]).sort_by("bucket")
    buckets = table.column("bucket").to_numpy()
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema) as writer:
        for lo, hi in ranges:
            a, b = np.searchsorted(buckets, [lo, hi])
            if b > a:
                writer.write_table(table.slice(a, b - a), row_group_size=b - a)
    L.atomic_write_bytes(run / L.PLAN_DIR / f"gather-{group:05d}.parquet", sink.getvalue().to_pybytes())
    return table.num_rows


def dedup_task(run_dir: str, num_groups: int, task: int, lo: int, hi: int) -> int:
    """Ray task body: the losers among buckets [lo, hi), from every gather file; -> how many."""
    run = S.as_path(run_dir)
    table = pa.concat_tables([  # a run has at least one group
        S.read_table(run / L.PLAN_DIR / f"gather-{group:05d}.parquet", filters=[("bucket", ">=", lo), ("bucket", "<", hi)])
        for group in range(num_groups)
    ])
    losers = find_duplicates(table)
    L.atomic_write_bytes(run / L.PLAN_DIR / f"dups-{task:05d}.parquet", table_bytes(losers, row_group_size=8192))
    return losers.num_rows


def losers_per_unit(run: Path) -> dict[int, int]:
    """unit index -> images dedup rejected in it (for planners that count kept images)."""
    counts: dict[int, int] = {}
    for path in sorted((run / L.PLAN_DIR).glob("dups-*.parquet")):
        units, n = np.unique(S.read_table(path, columns=["unit"]).column("unit").to_numpy(), return_counts=True)
        for u, c in zip(units.tolist(), n.tolist()):
            counts[u] = counts.get(u, 0) + c
    return counts
