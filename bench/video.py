"""Benchmark: video frames/s per core through the Ray read stage (decode each distinct frame
once, downscale, 256x256 crop), against a plain single-process decord loop that reads the same
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
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repo root, not bench/: bench/tokenize.py would shadow the stdlib

import pipelines  # noqa: E402,F401
from pipelines.video import VideoSource, plan_windows  # noqa: E402
from uvd.demo_world_media import write_video  # noqa: E402
from uvd.recipe import recipe_from_dict  # noqa: E402
from bench.common import local_ray, ray_stage  # noqa: E402


def plain_decord(source: VideoSource, units: list[str]) -> tuple[int, float]:
    """Frame uses/s of a plain loop: one get_batch per window, every stride on its own."""
    import decord

    start = time.perf_counter()
    uses = 0
    for unit in units:
        reader = decord.VideoReader(unit, num_threads=1)
        for windows in plan_windows(len(reader), source.options).values():
            for window in windows:
                uses += len(reader.get_batch(window).asnumpy())
    return uses, time.perf_counter() - start


def uvd_single(source: VideoSource, units: list[str]) -> tuple[int, float]:
    start = time.perf_counter()
    frames = sum(1 for unit in units for item in source.read_unit(unit) if not item.reject)
    return frames, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=4)
    parser.add_argument("--frames", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()


    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.videos):
            write_video(Path(tmp) / f"v{i}.mp4", args.frames, seed=i, width=args.width, height=args.height)
        source = VideoSource(recipe_from_dict({"source": "video", "inputs": tmp}))
        units = source.list_units()
        uses_per_video = sum(len(w) * 16 for w in plan_windows(args.frames, source.options).values())
        plain_decord(source, units[:1])  # warm the page cache and imports
        n_uses, t_plain = plain_decord(source, units)
        n_single, t_single = uvd_single(source, units)

        with local_ray(args.cpus):
            ray_stage(source, units[:1])  # warm the workers
            n_ray, t_ray = ray_stage(source, units)

    assert n_single == n_ray and n_uses == uses_per_video * args.videos, (n_single, n_ray, n_uses)
    print(f"{args.videos} videos, {args.frames} frames {args.width}x{args.height} H.264; strides 10/20/30, "
          f"{n_uses // 16} windows; {n_ray} distinct frames serve {n_uses} frame uses")
    plain = n_uses / t_plain
    print(f"plain decord loop, 1 process : {plain:8.1f} frame uses/s per core (native size, no resize)")
    print(f"uvd read_unit, 1 process     : {n_single / t_single:8.1f} decoded frames/s = "
          f"{n_uses / t_single:8.1f} frame uses/s per core (decode once + 256 short side)")
    print(f"uvd Ray stage, {args.cpus} CPUs        : {n_ray / t_ray / args.cpus:8.1f} decoded frames/s per core = "
          f"{n_uses / t_ray / args.cpus:8.1f} frame uses/s per core (+ 256x256 crop)")
    print(f"ratio (Ray frame uses per core / plain per core): {n_uses / t_ray / args.cpus / plain:.2f}")


if __name__ == "__main__":
    main()
