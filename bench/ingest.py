"""Benchmark: phase 1 of a run (read -> decode+resize -> encoder pool -> work file, one
`uvd.work.tokenize_part` Ray task per part) against a plain single-process loop doing the same
read + decode+resize (and, with --tokenizer, the same encoding) on the same files, alternating.

    .venv/bin/python bench/ingest.py [--shards 16] [--per-shard 150] [--cpus N] [--repeats 3]
                                     [--tokenizer none|test|small|...]

Both paths decode with `uvd.work.preprocess_item`. With `--tokenizer none` (default) the Ray
path's encoder pool is one model-less actor (pixels still travel to it) and the plain loop
stops after the resize; with a preset both encode with it. Rates are per wall second and per
CPU-second measured on every process involved (bench/common.py). Target: the Ray path keeps
>= 0.9 of the plain loop's rate per CPU-second.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/: bench/tokenize.py would shadow the stdlib

import uvd.pipelines  # noqa: E402,F401
from uvd.pipelines.laion import LaionSource  # noqa: E402
from uvd.demo.world import build_laion_world  # noqa: E402
from uvd.recipe import recipe_from_dict  # noqa: E402
from bench.common import (RayPhase1, compare, encoder_pool, local_ray, plain_phase1, plain_stage,  # noqa: E402
                          print_comparison, release_pool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=150)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="alternate the two paths this many times; medians")
    parser.add_argument("--tokenizer", default="none", help="'none' (read+preprocess only) or a tokenizer preset")
    args = parser.parse_args()

    tokenize = args.tokenizer != "none"
    with tempfile.TemporaryDirectory() as tmp:
        build_laion_world(Path(tmp), num_shards=args.shards, images_per_shard=args.per_shard, seed=1, broken=False)
        spec = {"source": "laion", "inputs": tmp}
        if tokenize:
            spec["tokenizer"] = {"config": args.tokenizer, "device": "cpu"}
        source = LaionSource(recipe_from_dict(spec))
        units = source.list_units()
        stage = plain_stage(source.recipe) if tokenize else None
        plain_phase1(source, units[:1], stage)  # warm the page cache and imports
        with local_ray(args.cpus):
            encoders = encoder_pool(source.recipe, tokenize)
            try:
                ray_path = RayPhase1(source, units, encoders)
                ray_path.warm(2 * args.cpus)  # start every worker
                result = compare(lambda: plain_phase1(source, units, stage), ray_path, args.cpus, args.repeats)
            finally:
                release_pool(encoders)
    what = f"tokenizer preset {args.tokenizer!r} on CPU" if tokenize else "no tokenizer"
    print(f"{result['count']} images (JPEG q90, 200-900 px sides) -> 256x256 RGB, center crop; {what}")
    print_comparison(result, "images")


if __name__ == "__main__":
    main()
