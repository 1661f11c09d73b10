"""Phase 2, inside a Ray task: turn a part's tokenized images into sentences and write them.

The task reads the part's work file, drops the exact duplicates the dedup step decided, lets
the source assemble each unit (unit-local sources) or materialize the sentences the planner
assigned to this part (sources whose sentences span units), writes the part's shards
`data/<source>-<part>-<k>.parquet` and its rejects `rejects/<source>-<part>.parquet`, and
last the part's write record (shards with counts, sizes and checksums): the commit point.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from uvd import layout as L
from uvd.records import DUPLICATE, DUPLICATE_KEY, ImageRecord, Reject, Sentence
from uvd.shards import rejects_table, sentences_table, shard_kwargs, table_bytes
from uvd.source import UnitImages
from uvd.work import read_work


def unit_rng(seed: int, unit: str) -> random.Random:
    """The assembly RNG of one unit: from the recipe seed and the unit's name (not its absolute
    path, nor the order units finish in), so the same inputs give the same sentences anywhere."""
    return random.Random(f"{seed}:{Path(unit).name}")


def read_duplicates(run: Path, part: int) -> dict[int, str]:
    """ordinal -> key of the first occurrence, for this part's items that dedup rejected."""
    out: dict[int, str] = {}
    for path in sorted((run / L.PLAN_DIR).glob("dups-*.parquet")):
        table = pq.read_table(path, filters=[("part", "=", part)], columns=["ordinal", "winner"])
        out.update(zip(table.column("ordinal").to_pylist(), table.column("winner").to_pylist()))
    return out


def part_images(run: Path, part: int, units: list[str], first_unit: int, dups: dict[int, str]
                ) -> tuple[list[UnitImages], list[Reject]]:
    """The part's work file -> tokenized images per unit (in reading order) and its rejects."""
    table = read_work(run, part)
    tokens = table.column("tokens").combine_chunks()
    flat = tokens.values.to_numpy(zero_copy_only=False).astype(np.uint16)
    offsets = tokens.offsets.to_numpy()
    cols = table.drop_columns(["tokens"]).to_pydict()
    by_unit: dict[int, list[ImageRecord]] = {}
    rejects: list[Reject] = []
    for i, key in enumerate(cols["key"]):
        unit = units[cols["unit"][i] - first_unit]
        if cols["reject"][i]:
            rejects.append(Reject(key, cols["reject"][i], cols["detail"][i], unit))
        elif cols["ordinal"][i] in dups:
            rejects.append(Reject(key, DUPLICATE, f"same bytes as {dups[cols['ordinal'][i]]}", unit))
        else:
            meta = json.loads(cols["meta"][i]) if cols["meta"][i] else {}
            by_unit.setdefault(cols["unit"][i], []).append(ImageRecord(
                key, flat[offsets[i]: offsets[i + 1]], cols["digest"][i].hex(), cols["width"][i], cols["height"][i], meta))
    unit_images = [UnitImages(u, by_unit.get(first_unit + j, [])) for j, u in enumerate(units)]
    return unit_images, rejects


class ShardWriter:
    """Sentences -> fixed-size shards of one part, each placed atomically with its checksum."""

    def __init__(self, run: Path, source: str, part: int, output: Any, tokenizer_id: str):
        self.run, self.source, self.part, self.output, self.tokenizer_id = run, source, part, output, tokenizer_id
        self.rows: list[dict[str, Any]] = []
        self.shards: dict[str, dict[str, Any]] = {}
        self.ids: set[str] = set()

    def add(self, sentence: Sentence) -> Reject | None:
        sentence.meta["tokenizer"] = self.tokenizer_id  # rows stay traceable when runs are mixed
        row = sentence.to_row(self.source)
        if row["id"] in self.ids:  # same source, task and keys twice: the reader gave a key twice
            return Reject(row["images"][-1], DUPLICATE_KEY, f"sentence {row['id']} already written from the same keys")
        self.ids.add(row["id"])
        self.rows.append(row)
        if len(self.rows) == self.output.sentences_per_shard:
            self.flush()
        return None

    def flush(self) -> None:
        if not self.rows:
            return
        name = L.shard_name(self.source, self.part, len(self.shards))
        o = self.output
        data = table_bytes(sentences_table(self.rows), **shard_kwargs(o.row_group_size, o.compression, o.compression_level))
        L.atomic_write_bytes(self.run / name, data)
        self.shards[name] = {**shard_counts(self.rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        self.rows = []


def shard_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by_task: dict[str, dict[str, int]] = {}
    for row in rows:
        t = by_task.setdefault(row["task"], {"sentences": 0, "images": 0, "tokens": 0})
        t["sentences"] += 1
        t["images"] += row["num_images"]
        t["tokens"] += len(row["tokens"])
    return {
        "sentences": len(rows),
        "images": sum(t["images"] for t in by_task.values()),
        "tokens": sum(t["tokens"] for t in by_task.values()),
        "by_task": dict(sorted(by_task.items())),
    }


def write_part(part: Any, source: Any, recipe: Any, run_dir: str, output_hash: str, tokenizer_id: str) -> dict[str, Any]:
    """Ray task body: the part's shards, rejects and write record; -> the record."""
    start = time.time()
    run = Path(run_dir)
    dups = read_duplicates(run, part.index) if recipe.filters.dedup else {}
    images, rejects = part_images(run, part.index, part.units, part.first_unit, dups)
    writer = ShardWriter(run, recipe.source, part.index, recipe.output, tokenizer_id)
    for obj in _sentences(source, recipe, run, part, images):
        reject = obj if isinstance(obj, Reject) else writer.add(obj)
        if reject is not None:
            rejects.append(reject)
    writer.flush()
    _remove_stale_shards(run, recipe.source, part.index, len(writer.shards))
    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r.reason] = by_reason.get(r.reason, 0) + 1
    rejects_file = L.rejects_name(recipe.source, part.index)
    L.atomic_write_bytes(run / rejects_file, table_bytes(rejects_table(rejects), compression="zstd"))
    counts = shard_counts([])
    for c in writer.shards.values():
        for k in ("sentences", "images", "tokens"):
            counts[k] += c[k]
    record = {"output_hash": output_hash, "part": part.index, "shards": writer.shards,
              "rejects": {"file": rejects_file, "count": len(rejects), "by_reason": dict(sorted(by_reason.items()))},
              "sentences": counts["sentences"], "images": counts["images"], "tokens": counts["tokens"],
              "inputs": sum(len(u.images) for u in images) + len(rejects), "seconds": time.time() - start}
    L.write_json(run / L.WRITES_DIR / f"{part.name}.json", record)
    return record


def _remove_stale_shards(run: Path, source: str, part: int, num_shards: int) -> None:
    """Shards of this part beyond the ones just written (an earlier run of another recipe into this
    folder made more): never left where a glob over data/ would read them."""
    k = num_shards
    while (run / L.shard_name(source, part, k)).is_file():
        (run / L.shard_name(source, part, k)).unlink()
        k += 1


def _sentences(source: Any, recipe: Any, run: Path, part: Any, images: list[UnitImages]) -> Iterator[Sentence | Reject]:
    if source.assembly == "global":
        yield from source.materialize(part, images, run)
    else:
        yield from assemble_units(source, images)


def assemble_units(source: Any, images: list[UnitImages]) -> Iterator[Sentence | Reject]:
    """Sentences of tokenized images, as a run makes them: each unit on its own with its own RNG
    (unit-local sources), or all units at once in memory (global sources; a run plans instead)."""
    if source.assembly == "global":
        yield from source.assemble(images)
        return
    for unit_images in images:
        source.rng = unit_rng(source.recipe.seed, unit_images.unit)
        yield from source.assemble([unit_images])


def write_valid(run: Path, part: int, output_hash: str, check: str = "size") -> tuple[bool, dict | None]:
    """The part's write record exists for this output and its shards and rejects are on disk
    (`check`: "exists", "size", or "sha256" to re-read every byte). -> (valid, record)."""
    try:
        record = L.read_json(run / L.WRITES_DIR / f"{L.part_name(part)}.json", "a write record")
    except L.CorruptRunError:
        return False, None
    if record is None or record.get("output_hash") != output_hash:
        return False, record
    if not (run / record["rejects"]["file"]).is_file():
        return False, record
    for name, counts in record["shards"].items():
        path = L.checked_name(run, name, "shard")
        if not path.is_file():
            return False, record
        if check in ("size", "sha256") and path.stat().st_size != counts["bytes"]:
            return False, record
        if check == "sha256" and hashlib.sha256(path.read_bytes()).hexdigest() != counts["sha256"]:
            return False, record
    return True, record
