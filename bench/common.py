"""What the benchmarks share: the run's phase 1 (`uvd.work.tokenize_part` in Ray tasks, with an
encoder pool) against a plain single-process loop on the same inputs, and one CPU meter for both.

CPU is measured, never assumed: the plain loop's is this process's user+system time (all its
threads); the Ray path's is that of this process and every process below it (the embedded Ray's
GCS, raylet and workers: /proc/<pid>/stat utime+stime, polled so that retired workers count). Rates per CPU-second are therefore comparable on a loaded machine; wall-clock rates
are not, and the bench says when the machine is too busy to trust either.
"""
from __future__ import annotations

import logging
import os
import resource
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from uvd.images import ImageRejected
from uvd.runtime import quiet_ray
from uvd.work import Part, preprocess_item, tokenize_part

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SPREAD_LIMIT = 0.20  # the plain loop's repeated runs may differ by this much before the ratio is suspect


@contextmanager
def local_ray(num_cpus: int) -> Iterator[None]:
    import ray

    quiet_ray()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


# ---------------------------------------------------------------- CPU meters

def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (decoders often run several)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds of the process, all its threads)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def _tree(table: dict[int, tuple[int, float]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            found.append(pid)
        todo.extend(children.get(pid, []))
    return found


class TreeCPU:
    """CPU seconds used by this process and all its descendants (an embedded Ray's daemons and
    workers are children of the driver) between start() and stop(). /proc is polled meanwhile, so
    a worker that Ray retires mid-way keeps the CPU it was last seen with, and a worker started
    mid-way counts from zero."""

    def __init__(self, root: int | None = None, interval: float = 0.2):
        self.root, self.interval = root or os.getpid(), interval
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self, initial: bool = False) -> None:
        table = _proc_table()
        for pid in _tree(table, self.root):
            cpu = table[pid][1]
            self.first.setdefault(pid, cpu if initial else 0.0)
            self.last[pid] = cpu

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "TreeCPU":
        self.first, self.last = {}, {}
        self._sample(initial=True)
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return sum(self.last[pid] - self.first[pid] for pid in self.last)


def measured(fn: Callable[[], int], tree: bool) -> tuple[int, float, float]:
    """(count, wall seconds, CPU seconds) of one call; CPU of this process alone, or with `tree`
    of this process and all its descendants."""
    meter = TreeCPU().start() if tree else None
    start_wall, start_cpu = time.perf_counter(), cpu_seconds()
    count = fn()
    wall, cpu = time.perf_counter() - start_wall, cpu_seconds() - start_cpu
    return count, wall, (meter.stop() if meter else cpu)


def plain_run(fn: Callable[[], int]) -> tuple[int, float, float]:
    return measured(fn, tree=False)


# ---------------------------------------------------------------- the two paths

class NullEncoder:
    """The encoder pool's place without a model: pixels still travel to an actor as in a run, so
    the Ray path measures read + decode + resize + transfer (the plain loops have no tokenizer)."""

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        return np.zeros((len(pixels), 256), np.uint16)

    def info(self) -> dict:
        return {"id": "none"}


def encoder_pool(recipe: Any, tokenize: bool) -> list:
    """The run's encoder pool for `recipe` (uvd.runner), or one NullEncoder actor in its place."""
    import ray

    if tokenize:
        from uvd.runner import _encoders

        return _encoders(recipe, {})
    actor = ray.remote(num_cpus=recipe.tokenizer.cpus_per_actor)(NullEncoder).remote()
    ray.get(actor.info.remote())
    return [actor]


def release_pool(encoders: list) -> None:
    from uvd.runner import _release_pools

    _release_pools(encoders)


class RayPhase1:
    """Phase 1 as a run does it: one `tokenize_part` Ray task per part of `units_per_part` units,
    sharing the encoder pool; each call writes fresh work files into a scratch run folder."""

    def __init__(self, source: Any, units: list[str], encoders: list, units_per_part: int = 1):
        import ray

        self.source_ref = ray.put(source)
        self.recipe = source.recipe
        self.encoders = encoders
        self.parts = [Part(i, units[s: s + units_per_part], s)
                      for i, s in enumerate(range(0, len(units), units_per_part))]
        self.scratch = tempfile.TemporaryDirectory(prefix="uvd-bench-")
        self.task = ray.remote(num_cpus=1)(tokenize_part)
        self.calls = 0

    def __call__(self, parts: list[Part] | None = None) -> int:
        """-> images kept (decoded and tokenized)."""
        import ray

        self.calls += 1
        run = Path(self.scratch.name) / str(self.calls)
        refs = [self.task.remote(p, self.source_ref, self.recipe, str(run), "bench", self.encoders)
                for p in (parts or self.parts)]
        records = ray.get(refs)
        return sum(kept for r in records for _, _, kept in r.per_unit)

    def warm(self, n: int) -> None:
        """Start the workers (imports, first decodes) on the first `n` parts."""
        self(self.parts[:n])


def plain_phase1(source: Any, units: list[str], stage: Any = None) -> int:
    """The same items through the same decode path (`preprocess_item`) in this process, and through
    the tokenizer `stage` in batches when given. -> images kept."""
    recipe = source.recipe
    batch: list[np.ndarray] = []
    count = 0
    for unit in units:
        for item in source.read_unit(unit):
            if item.reject:
                continue
            try:
                pixels = preprocess_item(item, recipe.image, recipe.filters)[0]
            except ImageRejected:
                continue
            count += 1
            if stage is not None:
                batch.append(pixels)
                if len(batch) == recipe.tokenizer.batch_size:
                    stage.encode_pixels(np.stack(batch))
                    batch.clear()
    if stage is not None and batch:
        stage.encode_pixels(np.stack(batch))
    return count


def plain_stage(recipe: Any, num_threads: int = 1) -> Any:
    """The tokenizer stage a run's CPU encoder actor would build, in this process."""
    from uvd.registry import get_tokenizer_stage
    from uvd.runner import _tokenizer_kwargs

    return get_tokenizer_stage()(**_tokenizer_kwargs(recipe), device="cpu", num_threads=num_threads)


# ---------------------------------------------------------------- comparing them

def compare(plain: Callable[[], int], ray_path: Callable[[], int], num_cpus: int, repeats: int) -> dict:
    """Alternate the plain loop and the Ray path `repeats` times (so drifting machine load hits
    both alike); medians of rates per wall second and per measured CPU second, and their ratio."""
    load_before = os.getloadavg()[0]
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "ray": []}  # (per s, per CPU s)
    count = None
    for _ in range(repeats):
        count, wall, cpu = measured(plain, tree=False)
        runs["plain"].append((count / wall, count / max(cpu, 1e-9)))
        ray_count, ray_wall, ray_cpu = measured(ray_path, tree=True)
        if ray_count != count:
            raise RuntimeError(f"the two paths disagree: plain kept {count}, Ray kept {ray_count}")
        runs["ray"].append((count / ray_wall, count / max(ray_cpu, 1e-9)))
    med = lambda xs: statistics.median(xs)  # noqa: E731
    r: dict[str, Any] = {"count": count, "num_cpus": num_cpus, "repeats": repeats, "runs": runs}
    for path in ("plain", "ray"):
        r[f"{path}_rate"] = med([w for w, _ in runs[path]])
        r[f"{path}_per_cpu"] = med([c for _, c in runs[path]])
        r[f"{path}_cores"] = r[f"{path}_rate"] / r[f"{path}_per_cpu"]
    r["ratio"] = r["ray_per_cpu"] / r["plain_per_cpu"]
    r["speedup"] = r["ray_rate"] / r["plain_rate"]
    plain_walls = [w for w, _ in runs["plain"]]
    r["plain_spread"] = (max(plain_walls) - min(plain_walls)) / med(plain_walls)
    r["load"] = max(load_before, os.getloadavg()[0])
    r["warnings"] = busy_warnings(r)
    return r


def busy_warnings(r: dict) -> list[str]:
    cores = os.cpu_count() or 1
    out = []
    if r["load"] > cores:
        out.append(f"load average {r['load']:.1f} > {cores} cores: other processes share the CPUs")
    if r["plain_spread"] > SPREAD_LIMIT:
        out.append(f"the plain loop's runs differ by {r['plain_spread']:.0%} (> {SPREAD_LIMIT:.0%})")
    return out


def print_comparison(r: dict, unit: str) -> None:
    runs = lambda xs: ", ".join(f"{w:.0f}" for w, _ in xs)  # noqa: E731
    print(f"plain loop, 1 process : {r['plain_rate']:8.1f} {unit}/s on {r['plain_cores']:.2f} cores = "
          f"{r['plain_per_cpu']:8.1f} per CPU-s   (runs: {runs(r['runs']['plain'])} /s)")
    print(f"Ray phase 1, {r['num_cpus']} CPUs  : {r['ray_rate']:8.1f} {unit}/s on {r['ray_cores']:.2f} cores = "
          f"{r['ray_per_cpu']:8.1f} per CPU-s   (runs: {runs(r['runs']['ray'])} /s)")
    print(f"ratio per CPU-second (Ray / plain): {r['ratio']:.2f}   wall-clock speed-up: {r['speedup']:.2f}x   "
          f"(medians of {r['repeats']}; CPU of every process involved; target ratio >= 0.9)")
    for warning in r["warnings"]:
        print(f"WARNING: machine too busy to trust these figures: {warning}")
