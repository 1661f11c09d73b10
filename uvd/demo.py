"""`uvd demo`: build a small sample world in the real input formats, run every demo recipe
on an embedded Ray, and print the statistics.

    uvd demo --out demo_out      # (make demo)
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from uvd.recipe import load_recipe
from uvd.runner import run_recipe
from uvd.runtime import ray_session
from uvd.stats import compute_stats, format_stats

log = logging.getLogger(__name__)

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"

# The demo runs the shipped recipes on the sample world, with small shards and the bundled
# CPU-sized tokenizer of the SPEC architecture, trained on the demo world (tokenizer/weights/demo-small).
DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "tokenizer" / "weights" / "demo-small"
DEMO_LVM_STEPS = 100  # ~2-3 min on 2 cores
DEMO_OVERRIDES = [f"tokenizer.weights={DEMO_TOKENIZER}", "tokenizer.batch_size=16", "output.sentences_per_shard=32"]


def build_world(root: Path, small: bool) -> dict:
    """The sample world: generated afresh each time (it is deterministic, so finished runs stay valid)."""
    from uvd.demo_world import build_demo_world
    from uvd.demo_world_annotated import build_annotated_world
    from uvd.demo_world_media import build_media_world

    shutil.rmtree(root, ignore_errors=True)
    world = build_demo_world(root / "images", seed=0, small=small)
    world["annotated"] = build_annotated_world(root / "annotated", seed=0)
    world["media"] = build_media_world(root / "media", seed=0)
    return world


def demo_jobs(world: dict) -> list[tuple[str, list[str]]]:
    """(recipe file, overrides) for each source in the sample world."""
    annotated = world["annotated"]
    return [
        ("laion.yaml", [f"inputs={world['laion']['path']}"]),
        ("imagenet_groups.yaml", [f"inputs={world['imagenet']['path']}"]),
        ("coco.yaml", [f"inputs={annotated['coco']['path']}"]),
        ("dense_annotations.yaml", [f"inputs={annotated['dense']['path']}"]),
        ("paired_folders.yaml", [f"inputs={annotated['paired']['path']}", "sentence.task=denoising"]),
        ("derived_pairs.yaml", [f"inputs={annotated['photos']['path']}"]),
        ("video.yaml", [f"inputs={world['media']['video']['path']}"]),
        ("objaverse.yaml", [f"inputs={world['media']['meshes']['path']}"]),
        ("annotated_video.yaml", [f"inputs={world['media']['annotated_video']['path']}"]),
    ]


def run_demo(out: Path, small: bool = False, progress: bool = True, train_lvm: bool = True) -> dict:
    start = time.time()
    world_dir, runs_dir = out / "world", out / "runs"
    world = build_world(world_dir, small)
    overrides = DEMO_OVERRIDES + (["limits.max_reject_rate=0.5"] if small else [])  # small world: 40% broken
    print(f"sample world written to {world_dir} ({time.time() - start:.1f} s)")
    summaries = []
    with ray_session():
        for recipe_file, job_overrides in demo_jobs(world):
            recipe = load_recipe(RECIPES_DIR / recipe_file, job_overrides + overrides)
            summary = run_recipe(recipe, runs_dir / recipe.source, progress=progress)
            summaries.append(summary)
            print(f"{recipe.source}: {summary.sentences} sentences, {summary.rejected} rejected, {summary.seconds:.1f} s")
    stats = compute_stats(runs_dir)
    print()
    print(format_stats(stats))
    if train_lvm:
        _train_demo_lvm(runs_dir, out / "lvm")
    info = summaries[0].tokenizer
    if not info.get("trained", True):
        print(
            f"\nNOTE: the demo's tokens come from an UNTRAINED tokenizer ({info['id']}, random weights): every "
            "stage is real, but the token ids carry no image meaning."
        )
    else:
        print(
            f"\ntokens from {info['id']}: the bundled demo tokenizer (SPEC architecture, 'small' widths), trained "
            f"on the demo world only ({DEMO_TOKENIZER / 'README.md'}: ~19 dB held-out PSNR, blurry but real)."
        )
    print(f"\ndemo finished in {time.time() - start:.0f} s; shards under {runs_dir}")
    return stats


def _train_demo_lvm(runs_dir: Path, out: Path) -> None:
    """Last step: a tiny LVM trained briefly on the demo shards, and one analogy prompt."""
    from uvd.registry import get_trainer_demo

    print("\ntraining a tiny LVM on the demo shards (a few minutes on 2 cores) ...")
    result = get_trainer_demo()(runs_dir, out, max_steps=DEMO_LVM_STEPS, task="colorization")
    loss = result["final_loss"]
    loss_text = f"final loss {loss:.3f}" if loss is not None else "already trained (resumed)"
    print(
        f"tiny LVM: {result['train']['step']} steps, {loss_text}; analogy prompt "
        f"({result['task']}: 5 pairs + query -> generated answer) written to {result['path']}"
    )
