"""The run folder's bookkeeping: `_manifest.json`, the resolved recipe, rejects, work cache.

The manifest is rewritten atomically after every finished shard, so it always says
which shards are complete; readers (stats, audit, training) trust only those.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

MANIFEST = "_manifest.json"
RECIPE_FILE = "_recipe.yaml"
REJECTS_FILE = "_rejects.parquet"
WORK_DIR = "_work"

log = logging.getLogger(__name__)


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    path = Path(run_dir) / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)


def find_runs(root: Path) -> list[Path]:
    """Run folders at or below `root` (folders holding a manifest), sorted."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return [root]
    return sorted(p.parent for p in root.rglob(MANIFEST))


def clear_run(run_dir: Path) -> None:
    """Remove everything a run wrote (for --overwrite), and nothing else."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir) or {}
    for name in manifest.get("shards", {}):
        (run_dir / name).unlink(missing_ok=True)
    for name in (MANIFEST, RECIPE_FILE, REJECTS_FILE):
        (run_dir / name).unlink(missing_ok=True)
    for tmp in run_dir.glob(".*.tmp"):
        tmp.unlink()
    shutil.rmtree(run_dir / WORK_DIR, ignore_errors=True)


def recipe_tokenizer_section(run_dir: Path) -> dict[str, Any]:
    """The `tokenizer:` section of a run's resolved recipe ({} when there is none)."""
    import yaml

    path = Path(run_dir) / RECIPE_FILE
    return (yaml.safe_load(path.read_text()) or {}).get("tokenizer", {}) if path.is_file() else {}
