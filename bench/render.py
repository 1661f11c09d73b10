"""Benchmark: multi-view renders/s per CPU-second through a run's phase 1 (`tokenize_part` Ray
tasks, objaverse source: load, normalize, 24 views at 256x256 offscreen, to a model-less encoder
actor), against a plain single-process loop
rendering the same meshes with the same renderer, in the same run.

    PYOPENGL_PLATFORM=osmesa .venv/bin/python bench/render.py [--copies 4] [--cpus N]

Meshes: the sample world's primitives (about 1k faces) and a 20k-face icosphere, each copied
`--copies` times.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/: bench/tokenize.py would shadow the stdlib

import uvd.pipelines  # noqa: E402,F401
from uvd.pipelines.objaverse import ObjaverseSource  # noqa: E402
from uvd.demo.world_media import build_mesh_world  # noqa: E402
from uvd.recipe import recipe_from_dict  # noqa: E402
from bench.common import (RayPhase1, compare, encoder_pool, local_ray, print_comparison,  # noqa: E402
                          release_pool)


def plain_loop(source: ObjaverseSource, units: list[str]) -> int:
    return sum(1 for unit in units for item in source.read_unit(unit) if not item.reject)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")

    import trimesh

    with tempfile.TemporaryDirectory() as tmp:
        world = build_mesh_world(Path(tmp) / "world", seed=0)
        meshes = Path(tmp) / "meshes"
        meshes.mkdir()
        sphere = trimesh.creation.icosphere(subdivisions=5)  # 20,480 faces
        sphere.visual.face_colors = (90, 140, 200, 255)
        sphere.export(meshes / "sphere.glb")
        for name in world["meshes"]:
            shutil.copy(Path(world["path"]) / name, meshes / name)
        for path in sorted(meshes.iterdir()):
            for c in range(1, args.copies):
                shutil.copy(path, meshes / f"{path.stem}_copy{c}{path.suffix}")
        source = ObjaverseSource(recipe_from_dict({"source": "objaverse", "inputs": str(meshes)}))
        units = source.list_units()
        plain_loop(source, units[:1])  # warm imports and the GL context
        with local_ray(args.cpus):
            encoders = encoder_pool(source.recipe, tokenize=False)
            try:
                ray_path = RayPhase1(source, units, encoders)
                ray_path.warm(2 * args.cpus)  # start every worker
                result = compare(lambda: plain_loop(source, units), ray_path, args.cpus, args.repeats)
            finally:
                release_pool(encoders)
    print(f"{len(units)} meshes x 24 views at 256x256, {os.environ['PYOPENGL_PLATFORM']} (Ray adds the 256x256 preprocess)")
    print_comparison(result, "renders")

if __name__ == "__main__":
    main()
