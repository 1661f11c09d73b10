"""Phase 1, inside a Ray task: read a part's units, decode and resize every item, tokenize the
images on the encoder actors, and write the part's work file (tokens, content digests, rejects)
and its record, all under `_uvd/`.

One task per part of consecutive units. Items keep their input order (`ordinal`), and encoder
batches are cut from that order, so the tokens never depend on which actor or node ran them.

With `labelers` in the recipe, every kept input image (an item whose meta role is `input`, or
has none) also goes to each labeler's actor pool, in chunks cut from the same order; each
labeler's rendering becomes an extra item `<key>#<name>` (meta `{"pair": key, "role": name}`)
placed right after its input, so its ordinal never depends on actor timing, and is tokenized
like any item. With `labelers.save` the raw labels go to `labels/<source>-<part>.parquet`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from uvd import layout as L
from uvd import storage as S
from uvd.images import ImageRejected, decode_file, resize_array
from uvd.records import CORRUPT_IMAGE, UNREADABLE, Item
from uvd.shards import WORK_SCHEMA, table_bytes, uint16_lists

log = logging.getLogger(__name__)

MAX_BATCHES_IN_FLIGHT = 2  # per part task: decode the next batch while the encoder runs this one
INPUT_ROLE = "input"  # the meta role of an input image (pipelines/pairing.py INPUT); only inputs are labeled
DIGEST_BUCKETS = 1 << 16  # dedup partitions by the first two bytes of the digest
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class Part:
    """Consecutive units processed (and resumed, and written) together."""

    index: int
    units: list[str]
    first_unit: int  # global index of units[0]
    budget: int | None = None  # with limits.max_items: items this part may still read

    @property
    def name(self) -> str:
        return L.part_name(self.index)


@dataclass
class PartRecord:
    """What a finished part reports back to the driver (small: counts only)."""

    part: int
    items: int = 0
    rejected: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    per_unit: list[list[int]] = field(default_factory=list)  # [unit index, items, kept images]
    seconds: float = 0.0


def preprocess_item(item: Item, image: Any, filters: Any) -> tuple[np.ndarray, int, int, bytes]:
    """One item -> ((size, size, 3) uint8 pixels, width, height, 16-byte content digest);
    raises ImageRejected with the reason. The one decode path of runs, tests and tokenizer training."""
    if item.array is not None:
        pixels, width, height = resize_array(item.array, image, filters)
        digest = hashlib.sha256(np.ascontiguousarray(item.array).tobytes()).digest()[:16]
    else:
        decoded = decode_file(item.data, image, filters)
        pixels, width, height = decoded.pixels, decoded.width, decoded.height
        if decoded.orientation != 1:  # a photo stored on its side was turned upright: say so
            item.meta = {**item.meta, "exif_transposed": True, "exif_orientation": decoded.orientation}
        digest = hashlib.sha256(item.data).digest()[:16]
    return pixels, width, height, digest


class EncoderActor:
    """The tokenizer stage in a Ray actor: one per GPU, or fractional-CPU actors."""

    def __init__(self, stage_cls: type, kwargs: dict[str, Any]):
        self.stage = stage_cls(**kwargs)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return self.stage.encode_pixels(pixels)  # (B, 256, 256, 3) uint8 -> (B, 256) uint16

    def info(self) -> dict[str, Any]:
        return self.stage.info


def tokenize_part(part: Part, source: Any, recipe: Any, run_dir: str, work_hash: str, encoders: list,
                  progress: Any = None, labelers: dict[str, list] | None = None) -> PartRecord:
    """Ray task body: the part's work file + record; -> the record's counts. `labelers`: name ->
    that labeler's actor pool (LabelerWorker actors), in the recipe's order."""
    import ray

    start = time.time()
    run = S.as_path(run_dir)
    cols: dict[str, list] = {name: [] for name in WORK_SCHEMA.names}
    record = PartRecord(part.index)
    batch_rows: list[int] = []
    batch_pixels: list[np.ndarray] = []
    in_flight: deque = deque()
    turn = part.index  # spread parts over the encoders deterministically; any actor gives the same tokens
    reported = 0

    def submit() -> None:
        nonlocal turn, reported
        encoder = encoders[turn % len(encoders)]
        turn += 1
        in_flight.append((list(batch_rows), encoder.encode.remote(np.stack(batch_pixels))))
        batch_rows.clear()
        batch_pixels.clear()
        while len(in_flight) > MAX_BATCHES_IN_FLIGHT:
            collect()
        if progress is not None:
            progress.add.remote(len(cols["key"]) - reported)
            reported = len(cols["key"])

    def collect() -> None:
        rows, ref = in_flight.popleft()
        tokens = ray.get(ref)
        for row, t in zip(rows, tokens):
            cols["tokens"][row] = t

    def encode(row: int, pixels: np.ndarray) -> None:
        batch_rows.append(row)
        batch_pixels.append(pixels)
        if len(batch_pixels) == recipe.tokenizer.batch_size:
            submit()

    # Labelers: kept rows wait in the current chunk (in ordinal order) until its labels are back.
    names = list(labelers or {})
    chunk_size = max((m.batch_size for m in recipe.labelers.models), default=1)
    chunk: dict[str, Any] = {"rows": [], "pixels": {}, "inputs": [], "labels": []}
    label_flight: deque = deque()
    label_rows: set[int] = set()
    saved: dict[str, list] = {"key": [], "input": [], "labeler": [], "label": []}

    def dispatch() -> None:
        nonlocal turn
        refs = {}
        if chunk["inputs"]:
            pixels_ref = ray.put(np.stack([chunk["pixels"][r] for r in chunk["inputs"]]))
            for name in names:
                pool = labelers[name]
                refs[name] = pool[turn % len(pool)].run.remote(pixels_ref)
            turn += 1
        label_flight.append((dict(chunk), refs))
        chunk.update(rows=[], pixels={}, inputs=[], labels=[])
        while len(label_flight) > MAX_BATCHES_IN_FLIGHT:
            finish_chunk()

    def finish_chunk() -> None:
        done, refs = label_flight.popleft()
        for j, name in enumerate(names):
            if name not in refs:
                continue
            rendered, raw = ray.get(refs[name])
            for i, (row, rows) in enumerate(zip(done["inputs"], done["labels"])):
                done["pixels"][rows[j]] = rendered[i]
                cols["digest"][rows[j]] = hashlib.sha256(np.ascontiguousarray(rendered[i]).tobytes()).digest()[:16]
                if raw is not None:
                    saved["key"].append(cols["key"][rows[j]])
                    saved["input"].append(cols["key"][row])
                    saved["labeler"].append(name)
                    saved["label"].append(raw[i])
        for row in done["rows"]:
            encode(row, done["pixels"].pop(row))

    def new_row(unit_id: int, key: str, meta: str, reject: str = "", detail: str = "", size=(0, 0), digest=None) -> int:
        cols["ordinal"].append(len(cols["key"]))
        cols["unit"].append(unit_id)
        cols["key"].append(key)
        cols["tokens"].append(np.zeros(0, np.uint16))
        cols["digest"].append(digest)
        cols["width"].append(size[0])
        cols["height"].append(size[1])
        cols["meta"].append(meta)
        cols["reject"].append(reject)
        cols["detail"].append(_ADDRESS.sub("", detail)[:300])  # "<... at 0x7f..>" would differ between runs
        return len(cols["key"]) - 1

    def add(unit_id: int, item: Item, reject: str = "", detail: str = "", pixels=None, size=(0, 0), digest=None):
        meta = json.dumps(item.meta, sort_keys=True) if item.meta and not reject else ""
        row = new_row(unit_id, item.key, meta, reject, detail, size, digest)
        if reject:
            record.rejected += 1
            record.by_reason[reject] = record.by_reason.get(reject, 0) + 1
        elif not names:
            encode(row, pixels)
        else:
            chunk["rows"].append(row)
            chunk["pixels"][row] = pixels
            if (item.meta or {}).get("role", INPUT_ROLE) != INPUT_ROLE:
                return  # an annotation or target image: not labeled
            chunk["inputs"].append(row)
            rows = []
            for name in names:  # right after its input: ordinals never depend on the actors
                label_meta = json.dumps({"pair": item.key, "role": name}, sort_keys=True)
                rows.append(new_row(unit_id, label_key(item.key, name), label_meta, size=(pixels.shape[1], pixels.shape[0])))
            label_rows.update(rows)
            chunk["rows"].extend(rows)
            chunk["labels"].append(rows)
            if len(chunk["inputs"]) == chunk_size:
                dispatch()

    budget = part.budget
    for offset, unit in enumerate(part.units):
        unit_id = part.first_unit + offset
        if budget is not None and budget <= 0:
            break
        items = kept = 0
        reader = source.read_unit(unit, budget)
        while True:
            try:
                item = next(reader)
            except StopIteration:
                break
            except (OSError, ValueError, EOFError) as err:  # the unit itself is unreadable (e.g. a tar cut short)
                log.warning("unit %s: %s", unit, err)
                add(unit_id, Item(key=f"{unit}#unit"), UNREADABLE, f"{type(err).__name__}: {err}")
                items += 1
                break
            items += 1
            if item.reject:
                add(unit_id, item, item.reject, item.detail)
            else:
                try:
                    pixels, width, height, digest = preprocess_item(item, recipe.image, recipe.filters)
                except ImageRejected as err:
                    add(unit_id, item, err.reason, err.detail)
                except Exception as err:  # noqa: BLE001  a decoder failure the image checks missed: one input's fault
                    log.warning("item %s: unexpected %s while decoding", item.key, type(err).__name__)
                    add(unit_id, item, CORRUPT_IMAGE, f"unexpected {type(err).__name__}: {err}")
                else:
                    add(unit_id, item, pixels=pixels, size=(width, height), digest=digest)
                    kept += 1
            if budget is not None and items >= budget:
                break
        if budget is not None:
            budget -= items
        record.items += items
        record.per_unit.append([unit_id, items, kept])
    if chunk["rows"]:
        dispatch()
    while label_flight:
        finish_chunk()
    if batch_pixels:
        submit()
    while in_flight:
        collect()
    if progress is not None:
        progress.add.remote(len(cols["key"]) - reported)

    if recipe.labelers.save and names:
        write_labels(run, L.labels_name(recipe.source, part.index), saved)
    write_work(run, part, cols, label_rows)
    record.seconds = time.time() - start
    L.write_json(run / L.PARTS_DIR / f"{part.name}.json", {"work_hash": work_hash, **record.__dict__, "labelers": names,
                                                           "units": part.units, "first_unit": part.first_unit})
    return record


def label_key(key: str, name: str) -> str:
    """The key of labeler `name`'s rendering of input `key` (as pipelines/pairing.py's annotation_key)."""
    return f"{key}#{name}"


LABELS_SCHEMA = pa.schema([("key", pa.string()), ("input", pa.string()), ("labeler", pa.string()), ("label", pa.binary())])


def write_labels(run: Path, name: str, saved: dict[str, list]) -> None:
    """`labels/<source>-<part>.parquet`: one row per rendering (its key, its input's key, the
    labeler's name, the raw label encoded as pipelines.labelers.encode_label writes it)."""
    table = pa.table({k: pa.array(saved[k], LABELS_SCHEMA.field(k).type) for k in LABELS_SCHEMA.names}, schema=LABELS_SCHEMA)
    L.atomic_write_bytes(run / name, table_bytes(table, compression="zstd"))


def write_work(run: Path, part: Part, cols: dict[str, list], label_rows: set[int] = frozenset()) -> None:
    """The work file (every row) and the digest file (kept rows, sorted by dedup bucket; labeler
    renderings are left out: they are never duplicates of their own, only follow their input)."""
    table = pa.table(
        {
            "ordinal": pa.array(cols["ordinal"], pa.int32()),
            "unit": pa.array(cols["unit"], pa.int32()),
            "key": pa.array(cols["key"], pa.string()),
            "tokens": uint16_lists(cols["tokens"]),
            "digest": pa.array(cols["digest"], pa.binary(16)),
            "width": pa.array(cols["width"], pa.int32()),
            "height": pa.array(cols["height"], pa.int32()),
            "meta": pa.array(cols["meta"], pa.string()),
            "reject": pa.array(cols["reject"], pa.string()),
            "detail": pa.array(cols["detail"], pa.string()),
        },
        schema=WORK_SCHEMA,
    )
    work = run / L.WORK_DIR
    L.atomic_write_bytes(work / f"{part.name}.parquet", table_bytes(table, compression="zstd"))
    kept = [i for i, d in enumerate(cols["digest"]) if d is not None and i not in label_rows]
    digests = [cols["digest"][i] for i in kept]
    buckets = [int.from_bytes(d[:2], "big") for d in digests]
    order = sorted(range(len(kept)), key=lambda j: (buckets[j], digests[j]))
    dtable = pa.table(
        {
            "bucket": pa.array([buckets[j] for j in order], pa.int32()),
            "digest": pa.array([digests[j] for j in order], pa.binary(16)),
            "part": pa.array([part.index] * len(order), pa.int32()),
            "ordinal": pa.array([kept[j] for j in order], pa.int32()),
            "unit": pa.array([cols["unit"][kept[j]] for j in order], pa.int32()),
            "key": pa.array([cols["key"][kept[j]] for j in order], pa.string()),
        }
    )
    L.atomic_write_bytes(work / f"{part.name}.digests.parquet", table_bytes(dtable, row_group_size=4096))


def read_work(run: Path, part: int) -> pa.Table:
    path = run / L.WORK_DIR / f"{L.part_name(part)}.parquet"
    try:
        return S.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise L.CorruptRunError(path, f"a work file is missing or damaged ({err})") from None


def work_valid(run: Path, part: int, work_hash: str, work_files: dict[str, int] | None = None) -> bool:
    """The part's work (file + record) exists and was made by this exact recipe and tokenizer
    (`work_files`: a listing of the work folder taken before, so no file is looked up one by one)."""
    name = L.part_name(part)
    try:
        record = L.read_json(run / L.PARTS_DIR / f"{name}.json", "a part record")
    except L.CorruptRunError:
        return False
    files = (f"{name}.parquet", f"{name}.digests.parquet")
    present = (all(f in work_files for f in files) if work_files is not None
               else all((run / L.WORK_DIR / f).is_file() for f in files))
    return record is not None and record.get("work_hash") == work_hash and present


class Progress:
    """A tiny Ray actor the part tasks report items to, so the driver's bar counts items."""

    def __init__(self) -> None:
        self.items = 0

    def add(self, n: int) -> None:
        self.items += n

    def get(self) -> int:
        return self.items
