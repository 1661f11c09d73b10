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
    from ray.data import DataContext

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
    context = DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    try:
        yield
    finally:
        ray.shutdown()


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())
