"""`uvd demo`: build a small sample world in the real input formats, run every shipped recipe
on it in one embedded Ray session, print the statistics, then train a tiny LVM briefly.

    uvd demo --out demo_out      # (make demo)
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from uvd.config import recipes_dir
from uvd.recipe import load_recipe
from uvd.registry import get_trainer_demo, plugin
from uvd.runner import run_recipe
from uvd.runtime import ray_session
from uvd.stats import compute_stats, format_stats

log = logging.getLogger(__name__)

# The demo runs the shipped recipes on the sample world, with small shards and the bundled
# CPU-sized tokenizer of the SPEC architecture, trained on the demo world (the tokenizer plug-in's
# `demo_tokenizer`: tokenizer/weights/demo-small).
DEMO_LVM_STEPS = 60
DEMO_SETTINGS = ["tokenizer.batch_size=16", "output.sentences_per_shard=32"]
# Wall-clock minutes to expect on 2 idle cores: (world + recipes, the LVM step). Measured on a shared
# 2-core machine under a load average of 5-9 from other jobs: full 2.4 + 1.9 min (198 CPU-s in all),
# --small --no-train 2.6 min; idle cores do better, so these round up.
EXPECTED_MINUTES = {"full": (2, 2), "small": (2, 2)}


def demo_overrides(small: bool) -> list[str]:
    """Overrides every demo recipe gets: the bundled demo tokenizer, small shards."""
    overrides = [f"tokenizer.weights={plugin('demo_tokenizer')()}", *DEMO_SETTINGS]
    return overrides + (["limits.max_reject_rate=0.5"] if small else [])  # the small world is 40% broken


def build_world(root: Path, small: bool) -> dict:
    """The sample world: generated afresh each time (it is deterministic, so finished runs stay valid)."""
    from uvd.demo.world import build_demo_world
    from uvd.demo.world_annotated import build_annotated_world
    from uvd.demo.world_media import build_media_world

    shutil.rmtree(root, ignore_errors=True)
    world = build_demo_world(root / "images", seed=0, small=small)
    world["annotated"] = build_annotated_world(root / "annotated", seed=0)
    world["media"] = build_media_world(root / "media", seed=0)
    world["text_tokenizer"] = build_text_tokenizer(root / "text" / "tokenizer.json")
    return world


def build_text_tokenizer(path: Path) -> str:
    """A byte-level BPE (the `tokenizers` library, GPT-2's kind) trained on the demo world's captions
    and category names: the in-context recipes' text tokenizer; nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from uvd.demo.world import CAPTION_STYLES, PHOTO_CAPTIONS
    from uvd.demo.world_annotated import CATEGORIES

    texts = [style.format(c) for c in PHOTO_CAPTIONS.values() for style in CAPTION_STYLES]
    texts += [f"{c['name']} at [12, 40, 300, 512]" for c in CATEGORIES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts * 4, trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return str(path)


# (recipe file, overrides) for each source, given the sample world's manifest.
DEMO_JOBS = [
    ("laion.yaml", lambda w: [f"inputs={w['laion']['path']}"]),
    # the first shard again with one labeler, the cheapest (Canny): `edges` pair sentences beside `single`
    ("laion_labeled.yaml", lambda w: [f"inputs={w['laion']['path']}", "limits.max_items=40",
                                      "labelers.models=[{name: edges, kind: edges, cpus_per_actor: 0.25}]"]),
    ("imagenet_groups.yaml", lambda w: [f"inputs={w['imagenet']['path']}"]),
    ("coco.yaml", lambda w: [f"inputs={w['annotated']['coco']['path']}"]),
    ("dense_annotations.yaml", lambda w: [f"inputs={w['annotated']['dense']['path']}"]),
    ("paired_folders.yaml", lambda w: [f"inputs={w['annotated']['paired']['path']}", "sentence.task=denoising"]),
    ("derived_pairs.yaml", lambda w: [f"inputs={w['annotated']['photos']['path']}"]),
    ("semantic_folders.yaml", lambda w: [f"inputs={w['annotated']['ade20k']['path']}"]),
    ("video.yaml", lambda w: [f"inputs={w['media']['video']['path']}"]),
    ("objaverse.yaml", lambda w: [f"inputs={w['media']['meshes']['path']}"]),
    ("annotated_video.yaml", lambda w: [f"inputs={w['media']['annotated_video']['path']}"]),
    # In-context sentences with text: a small BPE trained on the world's own captions stands in for GPT-2's.
    # (the sample laion shards are ~45% deliberately broken, and a small world leaves images without partners)
    ("incontext_caption.yaml", lambda w: [f"inputs={w['laion']['path']}", f"sentence.text_tokenizer={w['text_tokenizer']}",
                                          "sentence.examples=2", "limits.max_reject_rate=0.9"]),
    ("incontext_segmentation.yaml", lambda w: [f"inputs={w['annotated']['coco']['path']}", "sentence.examples=2",
                                               f"sentence.text_tokenizer={w['text_tokenizer']}", "sentence.min_area=0.002",
                                               "limits.max_reject_rate=0.9"]),
]


def demo_jobs(world: dict) -> list[tuple[str, list[str]]]:
    """(recipe file, overrides) for each source in the sample world."""
    return [(recipe_file, overrides(world)) for recipe_file, overrides in DEMO_JOBS]


def run_demo(out: Path, small: bool = False, progress: bool = True, train_lvm: bool = True) -> dict:
    start = time.time()
    data_minutes, lvm_minutes = EXPECTED_MINUTES["small" if small else "full"]
    expected = data_minutes + (lvm_minutes if train_lvm else 0)
    print(f"uvd demo: expect about {expected} minutes on 2 idle cores ({data_minutes} for the sample world and the "
          f"{len(DEMO_JOBS)} recipes" + (f", {lvm_minutes} to train a tiny LVM; --no-train skips it)" if train_lvm else ")"),
          flush=True)
    world_dir, runs_dir = out / "world", out / "runs"
    world = build_world(world_dir, small)
    overrides = demo_overrides(small)
    print(f"sample world written to {world_dir} ({time.time() - start:.1f} s)")
    summaries = []
    with ray_session():  # one Ray for every recipe: run_recipe reuses the session that is up
        for recipe_file, job_overrides in demo_jobs(world):
            recipe = load_recipe(recipes_dir() / recipe_file, overrides + job_overrides)  # the job's own win
            summary = run_recipe(recipe, runs_dir / Path(recipe_file).stem, progress=progress)
            summaries.append(summary)
            print(f"{Path(recipe_file).stem}: {summary.sentences} sentences, {summary.rejected} rejected, {summary.seconds:.1f} s")
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
            f"on the demo world only ({plugin('demo_tokenizer')() / 'README.md'}: ~19 dB held-out PSNR, blurry but real)."
        )
    print(f"\ndemo finished in {time.time() - start:.0f} s; shards under {runs_dir}")
    return stats


def _train_demo_lvm(runs_dir: Path, out: Path) -> None:
    """Last step: a tiny LVM trained briefly on the demo shards, and one analogy prompt (the model
    plug-in's `demo_lvm`)."""
    print(f"\ntraining a tiny LVM on the demo shards ({DEMO_LVM_STEPS} steps, about {EXPECTED_MINUTES['full'][1]} "
          "minutes on 2 idle cores) ...", flush=True)
    result = get_trainer_demo()(runs_dir, out, max_steps=DEMO_LVM_STEPS, task="colorization")
    loss = result["final_loss"]
    loss_text = f"final loss {loss:.3f}" if loss is not None else "already trained (resumed)"
    print(
        f"tiny LVM: {result['train']['step']} steps, {loss_text}; analogy prompt "
        f"({result['task']}: 5 pairs + query -> generated answer) written to {result['path']}"
    )
