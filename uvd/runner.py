"""Run a recipe end to end: inputs -> tokenized images (on Ray) -> sentences -> Parquet shards.

    uvd run recipes/laion.yaml --out out/laion [--address HEAD:6379]

Phase 1 (Ray Data, the heavy part): each unit of input is read, decoded and resized by
CPU tasks and tokenized by an actor pool (one actor per GPU, or CPU actors); the driver
caches every finished unit under `_work/`, so a killed run resumes where it stopped.
Phase 2 (driver, light): the source assembles the tokenized images into sentences, which
are cut into fixed-size shards and written atomically, the manifest updated after each.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from uvd import manifest as M
from uvd.images import preprocess_batch
from uvd.recipe import Recipe
from uvd.records import DUPLICATE, Item, Reject
from uvd.registry import get_source, get_tokenizer_stage
from uvd.runtime import cluster_resources, configure_data_context, ray_session
from uvd.shards import SCHEMA_VERSION, atomic_write_table, read_unit_cache, rejects_table, write_shard, write_unit_cache
from uvd.source import Source, UnitImages

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """The job ran but its output must not be used (e.g. too many inputs were rejected)."""


@dataclass
class RunSummary:
    out_dir: str
    sentences: int = 0
    images: int = 0
    tokens: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    shards: int = 0
    units_total: int = 0
    units_tokenized: int = 0  # units processed by this invocation (the rest came from the cache)
    already_complete: bool = False
    seconds: float = 0.0
    tokenizer: dict[str, Any] = field(default_factory=dict)


def run_recipe(
    recipe: Recipe,
    out_dir: str | Path,
    address: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    start = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    recipe_hash = recipe.hash()
    if overwrite:
        M.clear_run(out)
    manifest = M.read_manifest(out)
    if manifest and manifest["recipe_hash"] != recipe_hash:
        raise ValueError(
            f"--out {out}: holds a run of another recipe (hash {manifest['recipe_hash']}, this one {recipe_hash}); "
            "use --overwrite to start over, or another --out"
        )
    if manifest and manifest["status"] == "complete" and all((out / s).is_file() for s in manifest["shards"]):
        log.info("%s: already complete, nothing to do", out)
        return _summary_from_manifest(out, manifest, start, already_complete=True)

    source: Source = get_source(recipe.source)(recipe)
    units = source.list_units()
    if not units:
        raise ValueError(f"inputs: {recipe.inputs} holds no input for source {recipe.source!r}")
    (out / M.RECIPE_FILE).write_text(recipe.to_yaml())
    tokenizer_info = get_tokenizer_stage().describe(**_tokenizer_kwargs(recipe))
    if not tokenizer_info["trained"]:
        log.warning(
            "tokenizer %s has UNTRAINED weights (no tokenizer.weights given): its tokens carry no meaning",
            tokenizer_info["id"],
        )
    manifest = manifest or {
        "schema_version": SCHEMA_VERSION,
        "source": recipe.source,
        "recipe_hash": recipe_hash,
        "tokenizer": tokenizer_info,
        "status": "running",
        "shards": {},
    }
    manifest["units"] = len(units)
    M.write_manifest(out, manifest)

    work = out / M.WORK_DIR / "units"
    work.mkdir(parents=True, exist_ok=True)
    cached = {u: _unit_path(work, u) for u in units}
    todo = _units_to_read(units, cached, recipe.limits.max_items)
    num_tokenized = 0
    if todo:  # a run whose units are all cached needs no Ray at all
        with ray_session(address):
            while todo:
                num_tokenized += tokenize_units(todo, source, recipe, cached, progress)
                todo = _units_to_read(units, cached, recipe.limits.max_items)

    summary = write_sentences(source, recipe, units, cached, out, manifest, progress)
    summary.units_total, summary.units_tokenized = len(units), num_tokenized
    summary.tokenizer = tokenizer_info
    summary.seconds = time.time() - start
    if not recipe.output.keep_work:
        shutil.rmtree(out / M.WORK_DIR, ignore_errors=True)
    return summary


def _units_to_read(units: list[str], cached: dict[str, Path], max_items: int | None) -> list[str]:
    """Units still to tokenize; with a limit, only the next few needed to reach it, in order."""
    if max_items is None:
        return [u for u in units if not cached[u].exists()]
    covered, todo = 0, []
    for unit in units:
        if cached[unit].exists():
            covered += pq.read_metadata(cached[unit]).num_rows
        else:
            todo.append(unit)
            covered += max_items  # a unit reads at most max_items items; ask for it, then look again
        if covered >= max_items:
            break
    return todo


def _unit_path(work: Path, unit: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", unit)[-60:]
    return work / f"{hashlib.sha256(unit.encode()).hexdigest()[:12]}-{name}.parquet"


def _tokenizer_kwargs(recipe: Recipe) -> dict[str, Any]:
    t = recipe.tokenizer
    # With weights, their folder's config.json is the config (never assumed from the recipe).
    return {"config": None if t.weights else t.config, "weights": t.weights, "seed": t.seed, "dtype": t.dtype}


# ---------------------------------------------------------------- phase 1: tokenize units


def _item_row(unit: str, item: Item) -> dict[str, Any]:
    if item.array is not None:
        data, raw_shape = np.ascontiguousarray(item.array).tobytes(), json.dumps(list(item.array.shape))
    else:
        data, raw_shape = item.data, ""
    return {
        "unit": unit,
        "key": item.key,
        "data": data,
        "raw_shape": raw_shape,
        "meta": json.dumps(item.meta, sort_keys=True),
        "reject": item.reject,
        "detail": item.detail,
        "end": False,
        "num_rows": 0,
    }


def read_unit_rows(row: dict[str, Any], source: Source, max_items: int | None) -> Iterator[dict[str, Any]]:
    """Ray flat_map: a unit -> its item rows, then one `end` row carrying the unit's row count."""
    unit = row["unit"]
    count = 0
    try:
        for item in source.read_unit(unit, max_items):
            yield _item_row(unit, item)
            count += 1
    except (OSError, ValueError) as err:
        # The unit itself is unreadable (e.g. a tar cut short): record it, keep what was read.
        log.warning("unit %s: %s", unit, err)
        yield _item_row(unit, Item(key=f"{unit}#unit", reject="unreadable", detail=str(err)[:300]))
        count += 1
    yield {**_item_row(unit, Item(key="")), "end": True, "num_rows": count}


def _rows_to_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch = {}
    for name in rows[0]:
        column = np.empty(len(rows), dtype=object)
        column[:] = [r[name] for r in rows]
        batch[name] = column
    batch["end"] = batch["end"].astype(bool)
    batch["num_rows"] = batch["num_rows"].astype(np.int64)
    return batch


def read_and_preprocess(
    batch: dict[str, np.ndarray], source: Source, max_items: int | None, image: Any, filters: Any, chunk: int = 32
) -> Iterator[dict[str, np.ndarray]]:
    """Ray map_batches over units: read each unit and decode/resize its items in the same task,
    yielding batches of `chunk` preprocessed rows (encoded bytes never cross the object store)."""
    for unit in batch["unit"]:
        rows: list[dict[str, Any]] = []
        for row in read_unit_rows({"unit": unit}, source, max_items):
            rows.append(row)
            if len(rows) == chunk:
                yield preprocess_batch(_rows_to_batch(rows), image, filters)
                rows = []
        if rows:
            yield preprocess_batch(_rows_to_batch(rows), image, filters)


def tokenize_units(units: list[str], source: Source, recipe: Recipe, cached: dict[str, Path], progress: bool) -> int:
    """Read, preprocess and tokenize `units` on Ray; write each finished unit's cache file."""
    import ray.data
    from tqdm import tqdm

    configure_data_context()
    resources = cluster_resources()
    tok = recipe.tokenizer
    num_gpus = int(resources.get("GPU", 0))
    use_gpu = tok.device == "cuda" or (tok.device == "auto" and num_gpus > 0)
    if use_gpu and num_gpus == 0:
        raise ValueError("tokenizer.device: cuda asked for, but the Ray cluster has no GPU")
    num_actors = tok.num_actors or (num_gpus if use_gpu else 1)
    num_cpus = resources.get("CPU", 1)
    stage_kwargs = dict(
        _tokenizer_kwargs(recipe),
        device="cuda" if use_gpu else "cpu",
        num_threads=None if use_gpu else max(1, int(num_cpus // (2 * num_actors))),
    )
    log.info("tokenizing %d units: %d %s encoder actor(s)", len(units), num_actors, "GPU" if use_gpu else "CPU")

    ds = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(
        read_and_preprocess,
        fn_kwargs={"source": source, "max_items": recipe.limits.max_items, "image": recipe.image, "filters": recipe.filters},
        batch_size=1,
        batch_format="numpy",
    )
    ds = ds.map_batches(
        get_tokenizer_stage(),
        fn_constructor_kwargs=stage_kwargs,
        batch_size=tok.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=tok.cpus_per_actor,
    )
    columns = ("key", "tokens", "hash", "width", "height", "meta", "reject", "detail")
    partial: dict[str, dict[str, list]] = {}
    expected: dict[str, int] = {}
    done = 0
    bar = tqdm(total=len(units), unit="unit", desc=f"{recipe.source}: tokenize", disable=not progress)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for i, unit in enumerate(batch["unit"]):
            rows = partial.setdefault(unit, {c: [] for c in columns})
            if batch["end"][i]:
                expected[unit] = int(batch["num_rows"][i])
            else:
                for c in columns:
                    rows[c].append(batch[c][i])
            if unit in expected and len(rows["key"]) == expected[unit]:
                write_unit_cache(cached[unit], partial.pop(unit))
                del expected[unit]
                done += 1
                bar.update(1)
    bar.close()
    if partial:
        raise RuntimeError(f"Ray returned incomplete units: {sorted(partial)[:5]}")
    return done


# ---------------------------------------------------------------- phase 2: sentences -> shards


def _iter_units(recipe: Recipe, units: list[str], cached: dict[str, Path], rejects: list[Reject]) -> Iterator[UnitImages]:
    """Tokenized images unit by unit in input order, after the limit and exact-duplicate removal."""
    remaining = math.inf if recipe.limits.max_items is None else recipe.limits.max_items
    first_key: dict[bytes, str] = {}  # content hash -> key of its first occurrence
    for unit in units:
        if remaining <= 0:
            return
        images, unit_rejects, num_rows = read_unit_cache(cached[unit], unit, max_rows=remaining)
        remaining -= num_rows
        rejects.extend(unit_rejects)
        if recipe.filters.dedup:
            kept = []
            for image in images:
                digest = bytes.fromhex(image.content_hash[:32])
                if digest in first_key:
                    rejects.append(Reject(image.key, DUPLICATE, f"same bytes as {first_key[digest]}", unit))
                else:
                    first_key[digest] = image.key
                    kept.append(image)
            images = kept
        yield UnitImages(unit, images)


def write_sentences(
    source: Source, recipe: Recipe, units: list[str], cached: dict[str, Path], out: Path, manifest: dict, progress: bool
) -> RunSummary:
    from tqdm import tqdm

    per_shard = recipe.output.sentences_per_shard
    rejects: list[Reject] = []
    read_rejects = 0
    num_items = 0
    summary = RunSummary(out_dir=str(out))
    seen_ids: set[str] = set()
    rows: list[dict[str, Any]] = []
    shard_index = 0
    bar = tqdm(desc=f"{recipe.source}: write", unit="sentence", disable=not progress)

    def flush() -> None:
        nonlocal rows, shard_index
        name = f"{recipe.source}-{shard_index:05d}.parquet"
        counts = _shard_counts(rows)
        if manifest["shards"].get(name) != counts or not (out / name).is_file():
            write_shard(rows, out / name, recipe.output.row_group_size, recipe.output.compression, recipe.output.compression_level)
            manifest["shards"][name] = counts
            M.write_manifest(out, manifest)
        summary.shards += 1
        bar.update(len(rows))
        shard_index += 1
        rows = []

    def unit_stream() -> Iterator[UnitImages]:
        nonlocal read_rejects, num_items
        for unit_images in _iter_units(recipe, units, cached, rejects):
            num_items += len(unit_images.images)
            yield unit_images
        read_rejects = len(rejects)
        num_items += read_rejects
        _check_reject_rate(read_rejects, num_items, recipe, out, manifest, rejects)

    for obj in source.assemble(unit_stream()):
        if isinstance(obj, Reject):
            rejects.append(obj)
            continue
        obj.meta["tokenizer"] = manifest["tokenizer"]["id"]  # rows stay traceable when runs are mixed
        row = obj.to_row(recipe.source)
        assert row["id"] not in seen_ids, f"duplicate sentence id {row['id']}"
        seen_ids.add(row["id"])
        rows.append(row)
        summary.sentences += 1
        summary.images += row["num_images"]
        summary.tokens += len(row["tokens"])
        if len(rows) == per_shard:
            flush()
    if rows:
        flush()
    bar.close()
    stale = set(manifest["shards"]) - {f"{recipe.source}-{i:05d}.parquet" for i in range(shard_index)}
    for name in stale:  # shards of an earlier, larger output of the same recipe cannot exist; guard anyway
        (out / name).unlink(missing_ok=True)
        del manifest["shards"][name]

    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r.reason] = by_reason.get(r.reason, 0) + 1
    atomic_write_table(rejects_table(rejects), out / M.REJECTS_FILE, compression="zstd")
    manifest.update(
        status="complete",
        totals={"sentences": summary.sentences, "images": summary.images, "tokens": summary.tokens,
                "rejected": len(rejects), "inputs": num_items},
        rejects={"file": M.REJECTS_FILE, "count": len(rejects), "by_reason": dict(sorted(by_reason.items()))},
    )
    M.write_manifest(out, manifest)
    summary.rejected, summary.rejected_by_reason = len(rejects), manifest["rejects"]["by_reason"]
    return summary


def _shard_counts(rows: list[dict[str, Any]]) -> dict[str, Any]:
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
        "by_task": by_task,
    }


def _check_reject_rate(num_rejects: int, num_items: int, recipe: Recipe, out: Path, manifest: dict, rejects: list[Reject]) -> None:
    rate = num_rejects / max(num_items, 1)
    if rate <= recipe.limits.max_reject_rate:
        return
    atomic_write_table(rejects_table(rejects), out / M.REJECTS_FILE, compression="zstd")
    manifest["status"] = "failed"
    manifest["failure"] = f"{num_rejects} of {num_items} inputs rejected ({rate:.1%})"
    M.write_manifest(out, manifest)
    raise JobFailed(
        f"{num_rejects} of {num_items} inputs rejected ({rate:.1%}), over limits.max_reject_rate="
        f"{recipe.limits.max_reject_rate}; see {out / M.REJECTS_FILE}"
    )


def _summary_from_manifest(out: Path, manifest: dict, start: float, already_complete: bool) -> RunSummary:
    totals = manifest.get("totals", {})
    return RunSummary(
        out_dir=str(out),
        sentences=totals.get("sentences", 0),
        images=totals.get("images", 0),
        tokens=totals.get("tokens", 0),
        rejected=totals.get("rejected", 0),
        rejected_by_reason=manifest.get("rejects", {}).get("by_reason", {}),
        shards=len(manifest["shards"]),
        units_total=manifest.get("units", 0),
        already_complete=already_complete,
        seconds=time.time() - start,
        tokenizer=manifest.get("tokenizer", {}),
    )
