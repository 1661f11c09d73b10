"""Ray for UVD jobs: an embedded local Ray by default, or an existing cluster by address.

    uvd run RECIPE                          # embedded Ray on this machine
    uvd run RECIPE --address HEAD_IP:6379   # the same job on a running cluster
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Connect to `address` or start an embedded Ray; reuse one that is already up (tests)."""
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        host = address.split("://")[-1].rsplit(":", 1)[0]
        if host.startswith("127."):
            # A loopback cluster (several nodes on one machine): the driver must use the same address.
            kwargs["_node_ip_address"] = host
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
        ray.init(address="local", num_cpus=num_cpus, **kwargs)  # never attach to a stray local cluster
    try:
        yield
    finally:
        ray.shutdown()


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())


def configure_data_context() -> None:
    """Ray Data settings for UVD jobs (per driver process)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # the runner shows its own bar over units
    context.print_on_execution_start = False
    # Per-operator resource reservation holds back CPU slots for the tokenizer stage; with one
    # read+decode stage and a fixed-size fractional-CPU actor pool, it only idled cores:
    # bench/ingest.py measured 2.8-3.4 s with it and 1.8-2.1 s without on 2 cores.
    context.op_resource_reservation_enabled = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
