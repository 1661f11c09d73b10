"""The run's identity and index: `_manifest.json` (schema version, source, recipe hash,
tokenizer, status, totals and, once complete, every shard with its counts, size and checksum).

While a run works, the per-part records under `_uvd/` are the index (uvd/layout.py); the
manifest is rewritten at the start, at the end (compacted from the records) and on failure —
never once per shard. Readers (stats, audit, training) trust only the shards it lists.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from uvd import storage as S
from uvd.layout import MANIFEST, RECIPE_FILE, CorruptRunError, checked_name, read_json, write_json

REQUIRED = ("schema_version", "source", "recipe_hash", "status", "shards")

log = logging.getLogger(__name__)


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    """The run's manifest, or None when there is none; a damaged one names the file and the fix."""
    path = S.as_path(run_dir) / MANIFEST
    manifest = read_json(path, "the run manifest")
    if manifest is None:
        return None
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise CorruptRunError(path, f"the run manifest lacks {', '.join(missing)}")
    return manifest


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_json(S.as_path(run_dir) / MANIFEST, manifest)


def find_runs(root: Path) -> list[Path]:
    """Run folders at or below `root` (folders holding a manifest; local, or an object-store URI),
    sorted; symlinked run folders are followed."""
    return S.walk_manifests(S.as_path(root), MANIFEST)


def shard_paths(run_dir: Path, manifest: dict[str, Any]) -> list[tuple[Path, dict[str, Any]]]:
    """(path, counts) of every shard the manifest lists, each name checked (never outside the run)."""
    return [(checked_name(run_dir, name, "shard"), counts) for name, counts in sorted(manifest["shards"].items())]


def reject_paths(run_dir: Path, manifest: dict[str, Any]) -> list[Path]:
    """The rejects files the manifest lists (each checked); a listed file that is missing is a clear error."""
    paths = [checked_name(run_dir, name, "rejects") for name in manifest.get("rejects", {}).get("files", [])]
    for path in paths:
        if not path.is_file():
            raise CorruptRunError(path, "a rejects file the manifest lists is missing; rerun `uvd run` with the same "
                                        "recipe and --out to rewrite it")
    return paths


def recipe_tokenizer_section(run_dir: Path) -> dict[str, Any]:
    """The `tokenizer:` section of a run's resolved recipe ({} when there is none)."""
    import yaml

    path = S.as_path(run_dir) / RECIPE_FILE
    return (yaml.safe_load(path.read_text()) or {}).get("tokenizer", {}) if path.is_file() else {}


def read_rejects(run_dir: Path, columns: list[str] | None = None):
    """Every rejected input of a run, as one Arrow table (the rejects files its manifest lists)."""
    import pyarrow as pa

    from uvd.shards import REJECT_SCHEMA

    manifest = read_manifest(run_dir)
    if manifest is None:
        raise ValueError(f"{run_dir}: no UVD run here (no {MANIFEST})")
    tables = [S.read_table(p, columns=columns) for p in reject_paths(S.as_path(run_dir), manifest)]
    if not tables:
        return REJECT_SCHEMA.empty_table() if columns is None else REJECT_SCHEMA.empty_table().select(columns)
    return pa.concat_tables(tables)


def run_index(run_dir: Path, manifest: dict[str, Any]) -> tuple[dict[str, dict], dict[str, Any]]:
    """(shards: name -> counts, rejects: {files, count, by_reason}) of a run: the manifest's
    compacted index, or, while a run is still working (or failed), its parts' write records."""
    if manifest["status"] == "complete" or manifest["shards"]:
        return manifest["shards"], manifest.get("rejects", {"files": [], "count": 0, "by_reason": {}})
    from uvd.layout import WRITES_DIR

    shards: dict[str, dict] = {}
    rejects: dict[str, Any] = {"files": [], "count": 0, "by_reason": {}}
    for path in sorted((S.as_path(run_dir) / WRITES_DIR).glob("*.json")):
        record = read_json(path, "a write record")
        shards.update(record["shards"])
        rejects["files"].append(record["rejects"]["file"])
        rejects["count"] += record["rejects"]["count"]
        for reason, n in record["rejects"]["by_reason"].items():
            rejects["by_reason"][reason] = rejects["by_reason"].get(reason, 0) + n
    return shards, rejects
