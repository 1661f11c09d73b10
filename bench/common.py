"""What the benchmarks share: the job's Ray read+decode stage, timed, on an embedded Ray."""
from __future__ import annotations

import logging
import resource
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from uvd.runner import read_and_preprocess
from uvd.runtime import configure_data_context
from uvd.source import Source


@contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    configure_data_context()
    try:
        yield
    finally:
        ray.shutdown()


def ray_stage(source: Source, units: list[str]) -> tuple[int, float]:
    """(images out, seconds) of the phase-1 read+decode stage (`read_and_preprocess`, one task
    per unit), without the tokenizer; images are counted as the driver receives them."""
    import ray

    recipe = source.recipe
    ds = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(
        read_and_preprocess,
        fn_kwargs={"source": source, "max_items": None, "image": recipe.image, "filters": recipe.filters},
        batch_size=1,
        batch_format="numpy",
    )
    start = time.perf_counter()
    count = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        count += int(sum(1 for r, e in zip(batch["reject"], batch["end"]) if not r and not e))
    return count, time.perf_counter() - start


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (decoders often run several)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def plain_run(fn: Callable[[], int]) -> tuple[int, float, float]:
    """(count, wall seconds, CPU seconds) of a plain in-process loop. Its per-core rate is
    count / CPU seconds: a decoder that spreads over 1.4 cores must not count as one."""
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    count = fn()
    return count, time.perf_counter() - start_wall, cpu_seconds() - start_cpu


def compare(plain: Callable[[], int], ray_path: Callable[[], int], num_cpus: int, repeats: int) -> dict:
    """Alternate the plain loop and the Ray stage `repeats` times (so drifting machine load hits
    both alike) and return the medians: rates per second and per core, and their ratio."""
    plain_rates, plain_core_rates, ray_rates = [], [], []
    for _ in range(repeats):
        count, wall, cpu = plain_run(plain)
        plain_rates.append(count / wall)
        plain_core_rates.append(count / cpu)
        ray_count, seconds = ray_path()
        assert ray_count == count, (ray_count, count)
        ray_rates.append(ray_count / seconds)
    result = {
        "count": count,
        "plain_rate": statistics.median(plain_rates),
        "plain_per_core": statistics.median(plain_core_rates),
        "ray_rate": statistics.median(ray_rates),
        "ray_per_core": statistics.median(ray_rates) / num_cpus,
        "plain_runs": plain_rates,
        "ray_runs": ray_rates,
    }
    result["plain_cores"] = result["plain_rate"] / result["plain_per_core"]
    result["ratio"] = result["ray_per_core"] / result["plain_per_core"]
    return result


def print_comparison(r: dict, unit: str, num_cpus: int, repeats: int) -> None:
    runs = lambda xs: ", ".join(f"{x:.0f}" for x in xs)  # noqa: E731
    print(f"plain loop, 1 process : {r['plain_rate']:8.1f} {unit}/s on {r['plain_cores']:.2f} cores = "
          f"{r['plain_per_core']:8.1f} /core   (runs: {runs(r['plain_runs'])})")
    print(f"Ray stage, {num_cpus} CPUs      : {r['ray_rate']:8.1f} {unit}/s               = "
          f"{r['ray_per_core']:8.1f} /core   (runs: {runs(r['ray_runs'])})")
    print(f"ratio (Ray per core / plain per core): {r['ratio']:.2f}   (median of {repeats}; target >= 0.9)")
