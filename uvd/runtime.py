"""Ray for UVD jobs: an embedded local Ray by default, or an existing cluster by address.

    uvd run RECIPE                          # embedded Ray on this machine
    uvd run RECIPE --address HEAD_IP:6379   # the same job on a running cluster
    ray job submit -- uvd run RECIPE        # RAY_ADDRESS (set by Ray) names the cluster

An embedded Ray records its session folder; if the driver is killed, the next `uvd` start
stops what that session left running (only processes of that session folder).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)

SESSIONS_DIR = Path(tempfile.gettempdir()) / "uvd-ray-sessions"


def quiet_ray() -> None:
    """Keep Ray's start-up chatter out of UVD's progress bars (warnings stay on for real problems)."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Not RAY_BACKEND_LOG_LEVEL: whatever its value, every Ray process then prints "logging.cc: Set
    # ray log level from environment variable ..." to stderr (the driver's and each worker's reach
    # the terminal). UVD's actors take small constructor arguments, so the core's "has constructor
    # arguments in the object store" error line does not arise (tests/test_quiet.py checks both).
    warnings.filterwarnings("ignore", message=".*token.*auth.*", category=UserWarning)
    for name in ("ray", "ray.data", "ray._private", "ray.autoscaler"):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, dashboard: bool = False) -> Iterator[None]:
    """Connect to `address` (or RAY_ADDRESS) or start an embedded Ray; reuse one that is up (tests)."""
    import ray

    if ray.is_initialized():
        yield
        return
    quiet_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = dict(include_dashboard=dashboard, log_to_driver=True, logging_level=logging.ERROR,
                  configure_logging=True)
    if address:
        host = address.split("://")[-1].rsplit(":", 1)[0]
        if host.startswith("127.") and host != "127.0.0.1":
            # A loopback cluster (several nodes on one machine): the driver must use the same address.
            kwargs["_node_ip_address"] = host
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        if dashboard:
            check_dashboard()
        cleanup_orphans()
        context = ray.init(address="local", num_cpus=num_cpus, **kwargs)  # never attach to a stray local cluster
        _record_session()
        if dashboard:
            log.info("Ray dashboard: http://%s", context.dashboard_url)
    try:
        yield
    finally:
        ray.shutdown()
        _forget_session()


def check_dashboard() -> None:
    """--dashboard with a minimal Ray install: a clear error, not Ray's traceback."""
    import ray

    get_error = getattr(ray._private.utils, "get_dashboard_dependency_error", None)
    error = get_error() if get_error else None
    if error:
        raise ValueError(f"--dashboard: the Ray dashboard needs ray[default] (pip install 'ray[default]=={ray.__version__}'); "
                         f"{str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__}")


def _session_file() -> Path:
    return SESSIONS_DIR / f"{os.getpid()}.json"


def _record_session() -> None:
    try:
        import ray

        session_dir = ray._private.worker._global_node.get_session_dir_path()
        SESSIONS_DIR.mkdir(parents=True, exist_ok=True)
        _session_file().write_text(json.dumps({"pid": os.getpid(), "session_dir": session_dir}))
    except (AttributeError, OSError) as err:  # private API moved, or no writable temp dir: cleanup is best effort
        log.debug("could not record the Ray session: %s", err)


def _forget_session() -> None:
    _session_file().unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_orphans() -> int:
    """Stop the processes of embedded Ray sessions whose UVD driver died (SIGKILL leaves the
    agents running). Only processes whose command line names that session's folder. -> how many."""
    if not SESSIONS_DIR.is_dir():
        return 0
    stopped = 0
    for record_path in SESSIONS_DIR.glob("*.json"):
        try:
            record = json.loads(record_path.read_text())
            pid, session_dir = int(record["pid"]), str(record["session_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            record_path.unlink(missing_ok=True)
            continue
        if _alive(pid):
            continue
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if session_dir in cmdline and int(proc.name) != os.getpid():
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                    stopped += 1
                except OSError:
                    pass
        record_path.unlink(missing_ok=True)
        if stopped:
            log.info("stopped %d process(es) left by a killed UVD run (Ray session %s)", stopped, session_dir)
    return stopped


def cluster_resources() -> dict[str, float]:
    import ray

    return dict(ray.cluster_resources())
