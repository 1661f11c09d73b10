"""Benchmark: decode+resize images/s per core through the Ray stage, against a plain
single-process loop doing the same decode+resize on the same files, in the same run.

    .venv/bin/python bench/ingest.py [--shards 16] [--per-shard 150] [--cpus N] [--repeats 3]

Both paths run the same code (`LaionSource.read_unit` + `uvd.images.decode_image`); the Ray
path is the job's phase-1 pipeline (flat_map read -> map_batches preprocess) without the
tokenizer. Target: the Ray path keeps >= 0.9 of the plain loop's per-core rate.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/: bench/tokenize.py would shadow the stdlib

import pipelines  # noqa: E402,F401
from pipelines.laion import LaionSource  # noqa: E402
from demo.world import build_laion_world  # noqa: E402
from uvd.images import decode_image  # noqa: E402
from uvd.records import RejectError  # noqa: E402
from uvd.recipe import recipe_from_dict  # noqa: E402
from bench.common import compare, local_ray, print_comparison, ray_stage  # noqa: E402


def plain_loop(source: LaionSource, units: list[str]) -> int:
    recipe = source.recipe
    count = 0
    for unit in units:
        for item in source.read_unit(unit):
            try:
                decode_image(item.data, recipe.image, recipe.filters)
                count += 1
            except RejectError:
                pass
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=150)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="alternate the two paths this many times; medians")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        build_laion_world(Path(tmp), num_shards=args.shards, images_per_shard=args.per_shard, seed=1, broken=False)
        source = LaionSource(recipe_from_dict({"source": "laion", "inputs": tmp}))
        units = source.list_units()
        plain_loop(source, units[:1])  # warm the page cache and imports
        with local_ray(args.cpus):
            ray_stage(source, units[: 2 * args.cpus])  # start every worker
            result = compare(lambda: plain_loop(source, units), lambda: ray_stage(source, units), args.cpus, args.repeats)
    print(f"{result['count']} images (JPEG q90, 200-900 px sides) -> 256x256 RGB, center crop")
    print_comparison(result, "images", args.cpus, args.repeats)

if __name__ == "__main__":
    main()
