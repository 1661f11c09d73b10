"""Where runs and inputs live: a local folder, or an object store (s3://, gs://, hf://, any fsspec
protocol), behind one path type.

`as_path(location)` gives a `pathlib.Path` for a local location and a `UPath` (universal_pathlib,
the pathlib API over fsspec) for a URI, so the runner, the readers and the commit protocol use the
same calls (`/`, `is_file`, `read_bytes`, `glob`, `stat`, `unlink`) on both. What differs is here:

- **Placing a file** (`put_bytes`): locally, write a temporary name in the same folder and rename
  it; on an object store, one PUT of the whole object, which the store makes visible all at once
  (a multipart upload appears only when it completes), so a reader never sees half a file there
  either. The per-part record written last stays the commit point on both.
- **Parquet** (`read_table`, `parquet_file`): pyarrow gets the fsspec filesystem of a URI.
- **Deleting a folder** (`remove_tree`) and **finding runs** (`walk_manifests`).
- **The run lock** (`ObjectLock`): an object created only if absent (a conditional PUT,
  `If-None-Match: *`), with the holder's host, pid and a heartbeat; see its docstring.

Credentials and endpoints are fsspec's and the cloud SDKs' own: `AWS_ACCESS_KEY_ID`,
`AWS_ENDPOINT_URL` (S3-compatible stores such as MinIO), `GOOGLE_APPLICATION_CREDENTIALS`,
`HF_TOKEN`, or fsspec's `FSSPEC_S3_*` variables. Ray workers inherit the driver's environment on
an embedded Ray; on a cluster, set them on every node (or in the job's runtime_env).
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

_URI = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
LOCAL_PROTOCOLS = ("file", "local")


def is_uri(location: Any) -> bool:
    """An object-store (or other fsspec) URI, as opposed to a local path; `file://` counts as local."""
    text = str(location)
    return bool(_URI.match(text)) and text.split("://", 1)[0].lower() not in LOCAL_PROTOCOLS


def is_remote(path: Any) -> bool:
    return not isinstance(path, Path) or is_uri(path)


def as_path(location: Any) -> Any:
    """A local path -> pathlib.Path; a URI -> UPath (s3fs, gcsfs, huggingface_hub's HfFileSystem...).
    A URI whose protocol has no installed fsspec implementation is a ValueError naming the package."""
    if isinstance(location, Path) and not is_uri(location):
        return location
    text = os.fspath(location) if isinstance(location, os.PathLike) else str(location)
    if not is_uri(text):
        return Path(text.split("://", 1)[1] if _URI.match(text) else text)  # file:///x -> /x
    if not isinstance(location, str):
        return location  # already a UPath
    from upath import UPath

    try:
        return UPath(location)
    except (ImportError, ValueError) as err:
        protocol = location.split("://", 1)[0]
        hint = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "hf": "huggingface_hub", "az": "adlfs",
                "abfs": "adlfs"}.get(protocol, f"an fsspec implementation of {protocol!r}")
        raise ValueError(f"{location}: no filesystem for {protocol}:// ({err}); install {hint}") from None


# ---------------------------------------------------------------- files


def put_bytes(path: Any, data: bytes) -> None:
    """Place a whole file at once: tmp + rename locally, one PUT on an object store.
    OSError on failure (the caller turns a full disk into its own error)."""
    if is_remote(path):
        path.fs.pipe_file(path.path, data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_table(path: Any, **kwargs: Any):
    """pyarrow.parquet.read_table of a local path or an object-store path."""
    import pyarrow.parquet as pq

    if is_remote(path):
        return pq.read_table(path.path, filesystem=path.fs, **kwargs)
    return pq.read_table(path, **kwargs)


def read_schema(path: Any):
    import pyarrow.parquet as pq

    if is_remote(path):
        with path.open("rb") as f:
            return pq.read_schema(f)
    return pq.read_schema(path)


def parquet_file(path: Any):
    """pyarrow.parquet.ParquetFile of a local path or an object-store path (opened for reading)."""
    import pyarrow.parquet as pq

    if is_remote(path):
        return pq.ParquetFile(path.open("rb"))
    return pq.ParquetFile(path)


def remove_tree(path: Any) -> None:
    """Delete a folder (locally) or every object under a prefix (object store); absent is fine."""
    if is_remote(path):
        if path.fs.exists(path.path):
            path.fs.rm(path.path, recursive=True)
        return
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def walk_manifests(root: Any, manifest: str) -> list[Any]:
    """Folders at or below `root` holding `manifest` (not looking inside a found run or into
    `_`/`.` folders), sorted. Local folders follow symlinks."""
    if (root / manifest).is_file():
        return [root]
    found = []
    if is_remote(root):
        from upath import UPath

        protocol = root.protocol
        for hit in sorted(root.fs.glob(f"{root.path.rstrip('/')}/**/{manifest}")):
            folder = hit.rsplit("/", 1)[0]
            rel = folder[len(root.path.rstrip("/")) + 1:].split("/")
            if any(p.startswith(("_", ".")) for p in rel):
                continue
            if any(folder.startswith(str(f.path).rstrip("/") + "/") for f in found):
                continue
            found.append(UPath(f"{protocol}://{folder}", **root.storage_options))
        return found
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        if manifest in files:
            found.append(Path(folder))
            dirs[:] = []  # a run's own folders hold no runs
    return sorted(found)


def listing(folder: Any) -> dict[str, int]:
    """name -> size of the files directly in `folder` ({} when absent): one directory scan, or one
    paginated LIST on an object store (1000 names a request) instead of a HEAD per file."""
    if is_remote(folder):
        try:
            entries = folder.fs.ls(folder.path, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in entries if e.get("type") == "file"}
    try:
        with os.scandir(folder) as it:
            return {e.name: e.stat().st_size for e in it if e.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return {}


def io_map(fn: Any, items: list, threads: int = 32) -> list:
    """[fn(x) for x in items], run on a thread pool: the driver's per-part record reads are I/O
    (an object store answers each GET in ~10-50 ms; 164k of them in series would take an hour)."""
    if len(items) < 2:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
        return list(pool.map(fn, items))


def relative(path: Any, root: Any) -> str:
    """`path` below `root` as a POSIX string ("." for root itself)."""
    a, b = str(path).rstrip("/"), str(root).rstrip("/")
    return "." if a == b else a[len(b) + 1:] if a.startswith(b + "/") else a


def expand(pattern: str) -> list[Any]:
    """A URI, or a URI glob (`s3://b/laion/*.tar`), -> the matching paths, sorted."""
    path = as_path(pattern)
    if not any(c in path.path for c in "*?["):
        return [path] if path.exists() else []
    from upath import UPath

    return [UPath(f"{path.protocol}://{hit}", **path.storage_options) for hit in sorted(path.fs.glob(path.path))]


# ---------------------------------------------------------------- one writer at a time, on an object store


class ObjectLock:
    """The run lock on an object store, where there is no flock: the object `path` is created only if
    absent (conditional PUT). It holds the holder's host, pid, start time and a heartbeat the holder
    rewrites every `heartbeat_s`; it is deleted when the run ends. A lock left by a killed driver is
    taken over when its holder is known dead (same host, no such process) or its heartbeat is older
    than `stale_s`; otherwise the run is refused, naming the holder."""

    def __init__(self, path: Any, run_name: str, heartbeat_s: float = 30.0, stale_s: float = 300.0):
        self.path, self.run_name = path, run_name
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "since": self._since, "heartbeat": time.time()}).encode()

    def __enter__(self) -> "ObjectLock":
        self._since = time.time()
        fs, key = self.path.fs, self.path.path
        for _ in range(3):
            try:
                fs.pipe_file(key, self._body(), mode="create")
                break
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise ValueError(
                        f"--out {self.run_name}: another `uvd run` is writing this folder (pid {holder.get('pid')} on "
                        f"{holder.get('host')}, last heartbeat {time.time() - holder.get('heartbeat', 0):.0f} s ago); "
                        f"wait for it to finish or choose another --out (a lock silent for {self.stale_s:.0f} s is "
                        "taken over)") from None
                fs.rm(key)  # stale (or vanished between the PUT and the read): try again
        else:
            raise ValueError(f"--out {self.run_name}: could not take the run lock {self.path}")
        self._thread = threading.Thread(target=self._beat, name="uvd-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # unreadable: judged by age alone (heartbeat 0 -> stale)

    def _stale(self, holder: dict) -> bool:
        if time.time() - float(holder.get("heartbeat", 0)) > self.stale_s:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.path.fs.pipe_file(self.path.path, self._body())
            except OSError:
                pass  # a missed heartbeat only makes the lock look older

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder and holder.get("token") == self.token:
            self.path.fs.rm(self.path.path)


def iter_names(folder: Any) -> Iterator[str]:
    """File names directly in `folder` (none when it does not exist)."""
    try:
        yield from sorted(p.name for p in folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
