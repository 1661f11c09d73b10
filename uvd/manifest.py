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


def run_tokenizer_options(run_dir: Path) -> dict[str, Any]:
    """How a run's tokenizer is rebuilt: from its manifest's record and its resolved recipe.
    -> {config, weights, seed, trained, weights_sha256}."""
    run_dir = Path(run_dir)
    info = (read_manifest(run_dir) or {}).get("tokenizer")
    if not info:
        raise ValueError(f"{run_dir}: no run manifest naming its tokenizer")
    tok = recipe_tokenizer_section(run_dir)
    if info.get("trained") and not tok.get("weights"):
        raise ValueError(f"the run's tokenizer is trained but {run_dir / RECIPE_FILE} names no tokenizer.weights")
    if not info.get("trained") and not info.get("config"):
        raise ValueError(f"{run_dir}: the manifest records no tokenizer config")
    return {
        "config": None if info.get("trained") else info["config"],
        "weights": tok.get("weights") if info.get("trained") else None,
        "seed": int(tok.get("seed", 0) or 0),
        "trained": bool(info.get("trained")),
        "weights_sha256": info.get("weights_sha256"),
    }


def load_run_tokenizer(run_dir: Path) -> Any:
    """The tokenizer stage (on CPU) that made a run's shards: the recipe's weights when trained,
    else the recorded config with the recipe's seed. Needs the stage registered (import tokenizer)."""
    from uvd.registry import get_tokenizer_stage

    options = run_tokenizer_options(run_dir)
    stage = get_tokenizer_stage()(options["config"], weights=options["weights"], device="cpu", seed=options["seed"])
    if options["weights_sha256"] and stage.info["weights_sha256"] != options["weights_sha256"]:
        log.warning("%s: tokenizer %s is not the one that made the shards (%s...)", run_dir, stage.info["id"],
                    options["weights_sha256"][:12])
    return stage
