"""Benchmark: decode+resize images/s per core through the Ray stage, against a plain
single-process loop doing the same decode+resize on the same files, in the same run.

    .venv/bin/python bench/ingest.py [--shards 8] [--per-shard 150] [--cpus N]

Both paths run the same code (`LaionSource.read_unit` + `uvd.images.decode_image`); the Ray
path is the job's phase-1 pipeline (flat_map read -> map_batches preprocess) without the
tokenizer. Target: the Ray path keeps >= 0.9 of the plain loop's per-core rate.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/: bench/tokenize.py would shadow the stdlib

import pipelines  # noqa: E402,F401
from pipelines.laion import LaionSource  # noqa: E402
from uvd.demo_world import build_laion_world  # noqa: E402
from uvd.images import ImageRejected, decode_image  # noqa: E402
from uvd.recipe import recipe_from_dict  # noqa: E402
from bench.common import local_ray, ray_stage  # noqa: E402


def plain_loop(source: LaionSource, units: list[str]) -> tuple[int, float]:
    recipe = source.recipe
    start = time.perf_counter()
    count = 0
    for unit in units:
        for item in source.read_unit(unit):
            try:
                decode_image(item.data, recipe.image, recipe.filters)
                count += 1
            except ImageRejected:
                pass
    return count, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=150)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        build_laion_world(Path(tmp), num_shards=args.shards, images_per_shard=args.per_shard, seed=1, broken=False)
        recipe = recipe_from_dict({"source": "laion", "inputs": tmp})
        source = LaionSource(recipe)
        units = source.list_units()
        plain_loop(source, units[:1])  # warm the page cache and imports
        n_plain, t_plain = plain_loop(source, units)

        with local_ray(args.cpus):
            ray_stage(source, units[:2])  # warm the workers
            n_ray, t_ray = ray_stage(source, units)

    assert n_plain == n_ray, (n_plain, n_ray)
    plain_rate = n_plain / t_plain
    ray_rate = n_ray / t_ray
    print(f"images: {n_plain} (JPEG q90, 200-900 px sides) -> 256x256 RGB, center crop")
    print(f"plain loop, 1 process   : {plain_rate:8.1f} images/s  = {plain_rate:8.1f} /core")
    print(f"Ray stage, {args.cpus} CPUs        : {ray_rate:8.1f} images/s  = {ray_rate / args.cpus:8.1f} /core")
    print(f"ratio (Ray per core / plain per core): {ray_rate / args.cpus / plain_rate:.2f}   (target >= 0.9)")


if __name__ == "__main__":
    main()
