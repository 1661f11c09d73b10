"""What the benchmarks share: the job's Ray read+decode stage, timed, on an embedded Ray."""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

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
