"""Benchmark: video frames/s per CPU-second through a run's phase 1 (`tokenize_part` Ray tasks:
decode each distinct frame once, downscale, 256x256 crop, to a model-less encoder actor), against a plain single-process decord loop that reads the same
windows one by one with `get_batch` (the LVM release's approach), in the same run.

    .venv/bin/python bench/video.py [--videos 4] [--frames 480] [--width 640] [--height 360] [--cpus N]

Reports decoded frames/s and frame uses/s (frames delivered to sentences: 16 per window) per
core. Strides 10/20/30 share frames, so a frame use costs less than a decode.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/: bench/tokenize.py would shadow the stdlib

import uvd.pipelines  # noqa: E402,F401
from uvd.pipelines.video import VideoSource, plan_windows  # noqa: E402
from uvd.demo.world_media import write_video  # noqa: E402
from uvd.recipe import recipe_from_dict  # noqa: E402
from bench.common import (RayPhase1, compare, encoder_pool, local_ray, plain_run, print_comparison,  # noqa: E402
                          release_pool)


def plain_decord(source: VideoSource, units: list[str]) -> int:
    """Frame uses of a plain loop: one get_batch per window, every stride on its own."""
    import decord

    uses = 0
    for unit in units:
        reader = decord.VideoReader(unit, num_threads=1)
        for windows in plan_windows(len(reader), source.options).values():
            for window in windows:
                uses += len(reader.get_batch(window).asnumpy())
    return uses


def uvd_single(source: VideoSource, units: list[str]) -> int:
    return sum(1 for unit in units for item in source.read_unit(unit) if not item.reject)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=6)
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.videos):
            write_video(Path(tmp) / f"v{i}.mp4", args.frames, seed=i, width=args.width, height=args.height)
        source = VideoSource(recipe_from_dict({"source": "video", "inputs": tmp}))
        units = source.list_units()
        uses = args.videos * sum(len(w) * 16 for w in plan_windows(args.frames, source.options).values())
        plain_decord(source, units[:1])  # warm the page cache and imports
        frames, wall, cpu = plain_run(lambda: uvd_single(source, units))

        with local_ray(args.cpus):
            encoders = encoder_pool(source.recipe, tokenize=False)
            try:
                ray_path = RayPhase1(source, units, encoders)

                def ray_uses() -> int:  # phase 1 keeps distinct frames; count the uses they serve
                    count = ray_path()
                    return uses if count == frames else -count

                ray_path.warm(2 * args.cpus)  # start every worker
                result = compare(lambda: plain_decord(source, units), ray_uses, args.cpus, args.repeats)
            finally:
                release_pool(encoders)
    print(f"{args.videos} videos, {args.frames} frames {args.width}x{args.height} H.264; strides 10/20/30, "
          f"{uses // 16} windows; {frames} distinct frames serve {uses} frame uses")
    print(f"uvd read_unit, 1 process: {frames / wall:8.1f} decoded frames/s on {cpu / wall:.2f} cores = "
          f"{uses / cpu:8.1f} frame uses per CPU-s (decode once, shorter side 256)")
    print("plain = one decord get_batch per window at native size; Ray = read_unit + 256x256 crop, frame uses")
    print_comparison(result, "frame uses")

if __name__ == "__main__":
    main()
