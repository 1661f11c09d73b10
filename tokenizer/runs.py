"""The tokenizer that made a run's shards, rebuilt from the run's manifest and resolved recipe.

Used by the audit's sample strips, `uvd view` and `uvd prompt` (through the registry's
`run_tokenizer` plug-in), so tokens are always decoded by the model that wrote them.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from uvd.tokenizer.encode import ImageTokenizer
from uvd import manifest as M

log = logging.getLogger(__name__)


def run_tokenizer_options(run_dir: Path) -> dict[str, Any]:
    """How a run's tokenizer is rebuilt: from its manifest's record and its resolved recipe.
    -> {config, weights, seed, trained, weights_sha256}."""
    run_dir = Path(run_dir)
    info = (M.read_manifest(run_dir) or {}).get("tokenizer")
    if not info:
        raise ValueError(f"{run_dir}: no run manifest naming its tokenizer")
    tok = M.recipe_tokenizer_section(run_dir)
    if info.get("trained") and not tok.get("weights"):
        raise ValueError(f"the run's tokenizer is trained but {run_dir / M.RECIPE_FILE} names no tokenizer.weights")
    if not info.get("trained") and not info.get("config"):
        raise ValueError(f"{run_dir}: the manifest records no tokenizer config")
    return {
        "config": None if info.get("trained") else info["config"],
        "weights": tok.get("weights") if info.get("trained") else None,
        "seed": int(tok.get("seed", 0) or 0),
        "trained": bool(info.get("trained")),
        "weights_sha256": info.get("weights_sha256"),
    }


def load_run_tokenizer(run_dir: Path) -> ImageTokenizer:
    """The tokenizer stage (on CPU) that made a run's shards: the recipe's weights when trained,
    else the recorded config with the recipe's seed."""
    options = run_tokenizer_options(run_dir)
    stage = ImageTokenizer(options["config"], weights=options["weights"], device="cpu", seed=options["seed"])
    if options["weights_sha256"] and stage.info["weights_sha256"] != options["weights_sha256"]:
        log.warning("%s: tokenizer %s is not the one that made the shards (%s...)", run_dir, stage.info["id"],
                    options["weights_sha256"][:12])
    return stage
