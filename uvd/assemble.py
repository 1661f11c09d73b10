"""Phase 2, inside a Ray task: turn a part's tokenized images into sentences and write them.

The task reads the part's work file, drops the exact duplicates the dedup step decided, lets
the source assemble each unit (unit-local sources) or materialize the sentences the planner
assigned to this part (sources whose sentences span units), writes the part's shards
`data/<source>-<part>-<k>.parquet` and its rejects `rejects/<source>-<part>.parquet`, and
last the part's write record (shards with counts, sizes and checksums): the commit point.

Labeler renderings (`<key>#<name>`, meta role = the labeler's name) pair with their inputs like
file annotations: a pairing source (`pairs_labels`, pipelines/pairing.py PairsLabels) gets them
with its own images and the labeler names join its task list; any other source assembles its
own images as always, and the labelers' pair sentences (8 pairs per labeler, tuples over several)
are added beside them, unit by unit, its inputs counted once.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from uvd import layout as L
from uvd import storage as S
from uvd.records import DUPLICATE, DUPLICATE_KEY, ImageRecord, Reject, Sentence
from uvd.registry import plugin
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
        table = S.read_table(path, filters=[("part", "=", part)], columns=["ordinal", "winner"])
        out.update(zip(table.column("ordinal").to_pylist(), table.column("winner").to_pylist()))
    return out


def part_images(run: Path, part: int, units: list[str], first_unit: int, dups: dict[int, str],
                labels: list[str] | None = None) -> tuple[list[UnitImages], list[Reject]]:
    """The part's work file -> its sources' tokenized images per unit (in reading order) and its
    rejects; labeler renderings left out (`labels`: the labelers' names; default: the part record's)."""
    if labels is None:
        record = L.read_json(run / L.PARTS_DIR / f"{L.part_name(part)}.json", "a part record") or {}
        labels = record.get("labelers") or []
    images, rejects, _ = read_part(run, part, units, first_unit, dups, labels)
    return images, rejects


def is_label(image: ImageRecord, labels: list[str]) -> bool:
    role = image.meta.get("role")
    return role in labels and image.key == f"{image.meta.get('pair')}#{role}"


def read_part(run: Path, part: int, units: list[str], first_unit: int, dups: dict[int, str], labels: list[str] = ()
              ) -> tuple[list[UnitImages], list[Reject], list[UnitImages]]:
    """The part's work file -> (the sources' images per unit, rejects, the labelers' renderings
    per unit), each in reading order."""
    table = read_work(run, part)
    tokens = table.column("tokens").combine_chunks()
    flat = tokens.values.to_numpy(zero_copy_only=False).astype(np.uint16)
    offsets = tokens.offsets.to_numpy()
    cols = table.drop_columns(["tokens"]).to_pydict()
    by_unit: dict[int, list[ImageRecord]] = {}
    labels_by_unit: dict[int, list[ImageRecord]] = {}
    rejects: list[Reject] = []
    for i, key in enumerate(cols["key"]):
        unit = units[cols["unit"][i] - first_unit]
        if cols["reject"][i]:
            rejects.append(Reject(key, cols["reject"][i], cols["detail"][i], unit))
        elif cols["ordinal"][i] in dups:
            rejects.append(Reject(key, DUPLICATE, f"same bytes as {dups[cols['ordinal'][i]]}", unit))
        else:
            meta = json.loads(cols["meta"][i]) if cols["meta"][i] else {}
            image = ImageRecord(key, flat[offsets[i]: offsets[i + 1]], cols["digest"][i].hex(), cols["width"][i],
                                cols["height"][i], meta)
            (labels_by_unit if labels and is_label(image, labels) else by_unit).setdefault(cols["unit"][i], []).append(image)
    unit_images = [UnitImages(u, by_unit.get(first_unit + j, [])) for j, u in enumerate(units)]
    label_images = [UnitImages(u, labels_by_unit.get(first_unit + j, [])) for j, u in enumerate(units)]
    return unit_images, rejects, label_images


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


def write_part(part: Any, source: Any, recipe: Any, run_dir: str, output_hash: str, tokenizer_id: str,
               num_units: int | None = None) -> dict[str, Any]:
    """Ray task body: the part's shards, rejects and write record; -> the record. `num_units`: the
    units the run's parts cover (needed when the source assembles windows of several units)."""
    start = time.time()
    run = S.as_path(run_dir)
    dups = read_duplicates(run, part.index) if recipe.filters.dedup else {}
    names = recipe.labelers.names()
    images, rejects, labels = read_part(run, part.index, part.units, part.first_unit, dups, names)
    num_labels = sum(len(u.images) for u in labels)
    homes: dict[str, str] = {}
    window = source.assembly_window if source.assembly == "unit" else 1
    if window > 1:
        units_per_part = recipe.output.units_per_part or source.units_per_part
        images, labels, homes = window_units(run, recipe, part, images, labels, window, units_per_part,
                                             num_units if num_units is not None else part.first_unit + len(part.units))
    writer = ShardWriter(run, recipe.source, part.index, recipe.output, tokenizer_id)
    for obj in _with_labels(source, recipe, run, part, images, labels, names):
        reject = obj if isinstance(obj, Reject) else writer.add(obj)
        if reject is not None:
            if reject.key in homes:  # assembled in a window: the unit the input came from
                reject.unit = homes[reject.key]
            rejects.append(reject)
    writer.flush()
    _remove_stale_shards(run, recipe.source, part.index, len(writer.shards))
    label_keys = {im.key for u in labels for im in u.images}
    label_rejects = sum(r.key in label_keys for r in rejects)  # renderings left over: no input was bad
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
              "inputs": _items_read(run, part.index), "labels": num_labels,
              "label_rejects": label_rejects,
              "seconds": time.time() - start}
    L.write_json(run / L.WRITES_DIR / f"{part.name}.json", record)
    return record


def window_units(run: Path, recipe: Any, part: Any, images: list[UnitImages], labels: list[UnitImages], window: int,
                 units_per_part: int, num_units: int) -> tuple[list[UnitImages], list[UnitImages], dict[str, str]]:
    """The windows of `window` consecutive units (global unit indices [w*window, (w+1)*window)) that
    start in this part, each merged into one UnitImages named by its first unit; the images of units
    in other parts come from those parts' work files (their own rejects stay theirs to write).
    -> (windows, their labeler renderings, key -> the unit each image came from). A part in which no
    window starts assembles nothing: its units' sentences are its window owner's."""
    first, end = part.first_unit, part.first_unit + len(part.units)
    own = {first + j: pair for j, pair in enumerate(zip(images, labels))}
    others: dict[int, dict[int, tuple[UnitImages, UnitImages]]] = {}
    names = recipe.labelers.names()

    def unit(u: int) -> tuple[UnitImages, UnitImages]:
        if u in own:
            return own[u]
        q = u // units_per_part
        if q not in others:
            record = L.read_json(run / L.PARTS_DIR / f"{L.part_name(q)}.json", "a part record")
            if record is None:
                raise L.CorruptRunError(run / L.PARTS_DIR / f"{L.part_name(q)}.json", "a part record is missing")
            dups = read_duplicates(run, q) if recipe.filters.dedup else {}
            its_images, _, its_labels = read_part(run, q, record["units"], record["first_unit"], dups, names)
            others[q] = {record["first_unit"] + j: pair for j, pair in enumerate(zip(its_images, its_labels))}
        return others[q][u]

    windows, window_labels, homes = [], [], {}
    for w_start in range(-(-first // window) * window, end, window):
        members = [unit(u) for u in range(w_start, min(w_start + window, num_units))]
        for unit_images, unit_labels in members:
            homes.update((im.key, unit_images.unit) for im in unit_images.images + unit_labels.images)
        name = members[0][0].unit
        windows.append(UnitImages(name, [im for m, _ in members for im in m.images]))
        window_labels.append(UnitImages(name, [im for _, lab in members for im in lab.images]))
    return windows, window_labels, homes


def _items_read(run: Path, part: int) -> int:
    """Input items the part read in phase 1 (its record; labeler renderings are not inputs)."""
    record = L.read_json(run / L.PARTS_DIR / f"{L.part_name(part)}.json", "a part record")
    if record is None:
        raise L.CorruptRunError(run / L.PARTS_DIR / f"{L.part_name(part)}.json", "a part record is missing")
    return int(record["items"])


def _remove_stale_shards(run: Path, source: str, part: int, num_shards: int) -> None:
    """Shards of this part beyond the ones just written (an earlier run of another recipe into this
    folder made more): never left where a glob over data/ would read them."""
    k = num_shards
    while (run / L.shard_name(source, part, k)).is_file():
        (run / L.shard_name(source, part, k)).unlink()
        k += 1


def _with_labels(source: Any, recipe: Any, run: Path, part: Any, images: list[UnitImages], labels: list[UnitImages],
                 names: list[str]) -> Iterator[Sentence | Reject]:
    """The source's sentences and the labelers' (see the module docstring); every image ends in a
    sentence or a reject, an input used by either is never reported unused."""
    if not names or not any(u.images for u in labels):
        yield from _sentences(source, recipe, run, part, images)
        return
    if getattr(source, "pairs_labels", False):
        source.label_tasks = tuple(names)
        merged = [UnitImages(u.unit, u.images + lab.images) for u, lab in zip(images, labels)]
        yield from _sentences(source, recipe, run, part, merged)
        return
    made = list(label_unit_sentences(recipe, images, labels, names))
    used = {im.key for obj in made if isinstance(obj, Sentence) for im in obj.images}
    for obj in _sentences(source, recipe, run, part, images):
        if not (isinstance(obj, Reject) and obj.key in used):  # unused by the source, but in a labeler's sentence
            yield obj
    yield from made


def label_unit_sentences(recipe: Any, images: list[UnitImages], labels: list[UnitImages], names: list[str]
                         ) -> Iterator[Sentence | Reject]:
    """Per unit: the labelers' pair sentences and tuples over its inputs (the labelers plug-in's
    `label_sentences`, i.e. pipelines/pairing.py's pairing), with a unit RNG of their own."""
    label_sentences = plugin("labelers").label_sentences
    for unit_images, unit_labels in zip(images, labels):
        if not unit_labels.images:
            continue
        pairs = {im.meta["pair"] for im in unit_labels.images}
        inputs = [im for im in unit_images.images if im.key in pairs]
        rng = random.Random(f"{recipe.seed}:labels:{Path(unit_images.unit).name}")
        yield from label_sentences(UnitImages(unit_images.unit, inputs + unit_labels.images), names, rng)


def _sentences(source: Any, recipe: Any, run: Path, part: Any, images: list[UnitImages]) -> Iterator[Sentence | Reject]:
    if source.assembly == "global":
        yield from source.materialize(part, images, run)
    else:
        yield from _assemble_each(source, images)  # units, or windows write_part already merged


def assemble_units(source: Any, images: list[UnitImages]) -> Iterator[Sentence | Reject]:
    """Sentences of tokenized images, as a run makes them, from all units in memory (the units of a
    whole run, in order): each unit on its own with its own RNG (unit-local sources), windows of
    `source.assembly_window` consecutive units merged (rejects keep their own unit), or all units at
    once (global sources; a run plans instead)."""
    if source.assembly == "global":
        yield from source.assemble(images)
        return
    window = source.assembly_window
    if window == 1:
        yield from _assemble_each(source, images)
        return
    homes = {im.key: u.unit for u in images for im in u.images}
    merged = [UnitImages(images[i].unit, [im for u in images[i: i + window] for im in u.images])
              for i in range(0, len(images), window)]
    for obj in _assemble_each(source, merged):
        if isinstance(obj, Reject) and obj.key in homes:
            obj.unit = homes[obj.key]
        yield obj


def _assemble_each(source: Any, images: list[UnitImages]) -> Iterator[Sentence | Reject]:
    for unit_images in images:
        source.rng = unit_rng(source.recipe.seed, unit_images.unit)
        yield from source.assemble([unit_images])


def run_sizes(run: Path) -> dict[str, int]:
    """'data/NAME' / 'rejects/NAME' -> size of every shard and rejects file (two listings)."""
    return {f"{folder}/{name}": size for folder in (L.DATA_DIR, L.REJECTS_DIR)
            for name, size in S.listing(run / folder).items()}


def write_valid(run: Path, part: int, output_hash: str, check: str = "size",
                sizes: dict[str, int] | None = None) -> tuple[bool, dict | None]:
    """The part's write record exists for this output and its shards and rejects are on disk
    (`check`: "exists", "size", or "sha256" to re-read every byte; `sizes`: run_sizes() taken
    before, so no file is looked up one by one). -> (valid, record)."""
    try:
        record = L.read_json(run / L.WRITES_DIR / f"{L.part_name(part)}.json", "a write record")
    except L.CorruptRunError:
        return False, None
    if record is None or record.get("output_hash") != output_hash:
        return False, record
    rejects_file = record["rejects"]["file"]
    if not (rejects_file in sizes if sizes is not None else (run / rejects_file).is_file()):
        return False, record
    for name, counts in record["shards"].items():
        path = L.checked_name(run, name, "shard")
        if sizes is not None:
            size = sizes.get(name)
        else:
            size = path.stat().st_size if path.is_file() else None
        if size is None:
            return False, record
        if check in ("size", "sha256") and size != counts["bytes"]:
            return False, record
        if check == "sha256" and hashlib.sha256(path.read_bytes()).hexdigest() != counts["sha256"]:
            return False, record
    return True, record
