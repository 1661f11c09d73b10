"""Training data from the token shards: `[BOS] tokens [EOS]` per sentence, packed into windows.

Reads only the shards a run's manifest lists, of runs whose status is `complete` (unless
`data.include_incomplete`), following symlinked run folders. The data is split into mixture
components (a source, or `source/task` when the mixture names a task); each component is an
endless, per-epoch shuffled stream (shard order permuted, then a shuffle buffer of sentence
references), and the packer always draws from the component furthest below its weight, so the
realized token shares match the weights. Token rows are read one Parquet row group at a time.

There is one global stream of windows: each step takes `batch_size x world_size` windows and a
rank keeps its slice, so the position (`state_dict()`, plain JSON) is the same on every rank and
a run resumes at the exact window on any number of ranks. `Prefetcher` builds batches in a
background thread (into pinned memory on CUDA machines); its position is that of the batch last
handed to the trainer, not of the batches built ahead.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

import torch

from uvd.model.config import BOS_ID, EOS_ID, VOCAB_SIZE
from uvd import storage as S
from uvd.layout import MANIFEST
from uvd.manifest import read_manifest

logger = logging.getLogger(__name__)

STATE_VERSION = 2


def discover_runs(roots: list[str | Path], include_incomplete: bool = True, field_name: str = "data.runs") -> list[Path]:
    """Run folders (holding a manifest) at or below each root, following symlinks (each real folder
    once), sorted per root. Runs whose manifest status is not `complete` are left out, with a log
    line saying so, unless `include_incomplete`."""
    runs: list[Path] = []
    seen: set[str] = set()
    for root in roots:
        root = S.as_path(root)  # a local folder or an object-store URI
        if not root.exists():
            raise ValueError(f"{field_name}: {root} does not exist")
        found = []
        if S.is_remote(root):
            found = [run for run in S.walk_manifests(root, MANIFEST) if str(run) not in seen]
            seen.update(str(run) for run in found)
        for dirpath, dirnames, _ in ([] if S.is_remote(root) else os.walk(root, followlinks=True)):
            real = os.path.realpath(dirpath)
            if real in seen:  # a symlink loop, or a run reached twice
                dirnames[:] = []
                continue
            seen.add(real)
            if read_manifest(Path(dirpath)) is not None:
                found.append(Path(dirpath))
                dirnames[:] = []  # a run folder holds no runs
            else:
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for run in sorted(found):
            status = read_manifest(run).get("status")
            if status != "complete" and not include_incomplete:
                logger.warning("%s: leaving out run %s: its manifest status is %r, not 'complete' "
                               "(set data.include_incomplete: true to train on its listed shards)",
                               field_name, run, status)
                continue
            runs.append(run)
    return runs


@dataclass
class Component:
    key: str  # "laion" or "video/video_s10"
    source: str
    tasks: set[str]  # the tasks it draws from
    shards: list[Path] = field(default_factory=list)  # listed shards that hold any of those tasks
    tokens: int = 0  # natural size: visual tokens + BOS/EOS
    weight: float = 0.0


def find_components(runs: list[str | Path], mixture: dict[str, float] | None = None,
                    include_incomplete: bool = False, task_alpha: float | None = None) -> list[Component]:
    """Components of the data under `runs`, weighted. A component the mixture does not name
    weighs its natural token share; weights are relative; weight 0 leaves a component out.
    With `task_alpha` (task-homogeneous batches) every SOURCE/TASK is a component weighing
    tokens^task_alpha (tokens: visual tokens + BOS/EOS), and the mixture may only hold 0s."""
    mixture = dict(mixture or {})
    if task_alpha is not None:
        for key, weight in mixture.items():
            if weight != 0:
                raise ValueError(f"data.mixture.{key}: with data.batching: task the weights are size^data.task_alpha; "
                                 "the mixture may only leave components out (weight 0)")
    by_source: dict[str, dict[str, dict]] = {}  # source -> task -> {"tokens", "shards"}
    run_dirs = discover_runs(runs, include_incomplete)
    if not run_dirs:
        raise ValueError(f"data.runs: no complete run folders (with a manifest) under {', '.join(map(str, runs)) or '[]'}"
                         + ("" if include_incomplete else " (incomplete runs are left out unless data.include_incomplete)"))
    for run in run_dirs:
        manifest = read_manifest(run)
        for name, counts in sorted(manifest["shards"].items()):
            for task, c in counts.get("by_task", {}).items():
                entry = by_source.setdefault(manifest["source"], {}).setdefault(task, {"tokens": 0, "shards": []})
                entry["tokens"] += c["tokens"] + 2 * c["sentences"]
                entry["shards"].append(run / name)
    for key in mixture:
        source, _, task = key.partition("/")
        if source not in by_source or (task and task not in by_source[source]):
            known = ", ".join(sorted(by_source) + sorted(f"{s}/{t}" for s in by_source for t in by_source[s]))
            raise ValueError(f"data.mixture.{key}: not in the data; known components: {known}")
    total = sum(t["tokens"] for tasks in by_source.values() for t in tasks.values())
    components = []
    for source in sorted(by_source):
        tasks = by_source[source]
        if task_alpha is not None:  # one component per task
            groups = [(f"{source}/{t}", {t}) for t in sorted(tasks)]
        else:
            groups = [(f"{source}/{t}", {t}) for t in sorted(tasks) if f"{source}/{t}" in mixture]
            rest = {t for t in tasks if f"{source}/{t}" not in mixture}
            if rest:
                groups.append((source, rest))
        for key, group in groups:
            tokens = sum(tasks[t]["tokens"] for t in group)
            shards = sorted({s for t in group for s in tasks[t]["shards"]})
            if task_alpha is not None:
                weight = 0.0 if mixture.get(source) == 0 or mixture.get(key) == 0 else float(tokens) ** task_alpha
            else:
                weight = mixture.get(key, tokens / total if total else 0.0)
            components.append(Component(key, source, group, shards, tokens, float(weight)))
    components = [c for c in components if c.weight > 0 and c.tokens > 0]
    if not components:
        raise ValueError("data.mixture: every component has weight 0 (or the runs hold no sentences)")
    norm = sum(c.weight for c in components)
    for c in components:
        c.weight /= norm
    return components


def text_tokenizers(runs: list[str | Path], include_incomplete: bool = True) -> dict[str, dict[str, Any]]:
    """sha256 -> {vocab_size, offset, runs} of the text tokenizers whose ids the runs' rows carry
    (`meta.text_tokenizer`, pipelines/text.py). A run is one recipe, so its first shard's first row
    group says it; pixel-only runs have none."""
    found: dict[str, dict[str, Any]] = {}
    for run in discover_runs(runs, include_incomplete, field_name="data.runs"):
        shards = sorted(read_manifest(run)["shards"])
        if not shards:
            continue
        metas = S.parquet_file(run / shards[0]).read_row_group(0, columns=["meta"]).column("meta").to_pylist()
        for text in metas:
            info = json.loads(text).get("text_tokenizer") if text else None
            if info:
                entry = found.setdefault(info["sha256"], {"vocab_size": int(info["vocab_size"]),
                                                          "offset": int(info["offset"]), "runs": []})
                if str(run) not in entry["runs"]:
                    entry["runs"].append(str(run))
    return found


def data_vocab_size(runs: list[str | Path], include_incomplete: bool = True) -> int:
    """The vocabulary the runs' ids need: VOCAB_SIZE (visual + special ids), or offset + the text
    vocabulary when rows carry text. Two text tokenizers cannot share the one id space: ValueError."""
    found = text_tokenizers(runs, include_incomplete)
    if len(found) > 1:
        which = "; ".join(f"{sha[:12]} in {', '.join(e['runs'])}" for sha, e in found.items())
        raise ValueError(f"data.runs: rows of {len(found)} different text tokenizers ({which}) would share one id space; "
                         "tokenize every run's text with the same tokenizer.json")
    return max([VOCAB_SIZE] + [e["offset"] + e["vocab_size"] for e in found.values()])


def check_vocab_size(vocab_size: int, runs: list[str | Path], field_name: str = "model.vocab_size") -> int:
    """ValueError when a model of `vocab_size` ids cannot read the runs' ids; -> the size they need."""
    need = data_vocab_size(runs)
    if need > vocab_size:
        raise ValueError(f"{field_name}: {vocab_size} ids are too few for these runs: their rows carry text ids up to "
                         f"{need - 1} ({VOCAB_SIZE} visual and special ids + the text tokenizer's vocabulary); "
                         f"the model needs vocab_size >= {need}")
    return need


def fit_vocab_size(model_config: Any, runs: list[str | Path]) -> None:
    """Training: a model left at the LVM's VOCAB_SIZE grows to what the runs need (text); a size set
    otherwise must already fit them (ValueError)."""
    need = data_vocab_size(runs)
    if need > model_config.vocab_size and model_config.vocab_size == VOCAB_SIZE:
        logger.info("model.vocab_size: %d -> %d (the runs carry text ids)", VOCAB_SIZE, need)
        model_config.vocab_size = need
    check_vocab_size(model_config.vocab_size, runs)


class RowGroupReader:
    """Token rows of shards, read one Parquet row group at a time; the last `capacity` groups are kept."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self.starts: dict[Path, np.ndarray] = {}  # first row of each row group (+ the row count at the end)
        self.groups: OrderedDict[tuple[Path, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.num_reads = 0  # row groups read (a measure for tests and the bench)

    def row_starts(self, path: Path) -> np.ndarray:
        if path not in self.starts:
            meta = S.parquet_file(path).metadata
            self.starts[path] = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        return self.starts[path]

    def tasks(self, path: Path) -> list[str]:
        """The task column of a shard (small: dictionary-encoded strings)."""
        return S.read_table(path, columns=["task"]).column("task").to_pylist()

    def sentence(self, path: Path, row: int) -> np.ndarray:
        starts = self.row_starts(path)
        group = int(np.searchsorted(starts, row, side="right")) - 1
        key = (path, group)
        if key not in self.groups:
            tokens = S.parquet_file(path).read_row_group(group, columns=["tokens"]).column("tokens").combine_chunks()
            self.groups[key] = (tokens.values.to_numpy(zero_copy_only=False), tokens.offsets.to_numpy())
            self.num_reads += 1
            while len(self.groups) > self.capacity:
                self.groups.popitem(last=False)
        self.groups.move_to_end(key)
        flat, offsets = self.groups[key]
        i = row - int(starts[group])
        return flat[offsets[i] : offsets[i + 1]]


class ComponentStream:
    """One component's endless sentence stream: (shard index, row) references, the same on every rank."""

    def __init__(self, comp: Component, index: int, seed: int, buffer_size: int):
        self.comp, self.index, self.seed, self.buffer_size = comp, index, seed, buffer_size
        self.reader = RowGroupReader(capacity=2)
        self.rng = np.random.default_rng([seed, index, 1])
        self.epoch, self.shard_pos, self.row_pos = 0, 0, 0
        self.buffer: list[tuple[int, int]] = []
        # The tokens of the buffer's sentences, read as they enter it: row groups are read in stream
        # order, each once per epoch (a sentence can stay in a shuffle buffer long after its row group).
        self.held: list[np.ndarray] = []
        self._order: tuple[int, list[int]] | None = None  # (epoch, shard order), memoized
        self._rows_of: tuple[int, list[int]] | None = None  # (shard, its rows for this component)

    def _shard_order(self) -> list[int]:
        if self._order is not None and self._order[0] == self.epoch:
            return self._order[1]
        order = np.random.default_rng([self.seed, self.index, 0, self.epoch]).permutation(len(self.comp.shards))
        self._order = (self.epoch, order.tolist())
        return self._order[1]

    def _rows(self, shard: int) -> list[int]:
        if self._rows_of is not None and self._rows_of[0] == shard:
            return self._rows_of[1]
        rows = [i for i, t in enumerate(self.reader.tasks(self.comp.shards[shard])) if t in self.comp.tasks]
        self._rows_of = (shard, rows)
        return rows

    def _next_in_order(self) -> tuple[int, int]:
        empty_epochs = 0
        while True:
            order = self._shard_order()
            if self.shard_pos < len(order):
                shard = order[self.shard_pos]
                rows = self._rows(shard)
                if self.row_pos < len(rows):
                    self.row_pos += 1
                    return shard, rows[self.row_pos - 1]
                self.shard_pos, self.row_pos = self.shard_pos + 1, 0
                continue
            self.epoch, self.shard_pos, self.row_pos = self.epoch + 1, 0, 0
            empty_epochs += 1
            if empty_epochs > 1:
                raise ValueError(f"data: component {self.comp.key} has no sentences")

    def _read(self, ref: tuple[int, int]) -> np.ndarray:
        return self.reader.sentence(self.comp.shards[ref[0]], ref[1]).copy()  # a copy frees the row group

    def next(self) -> np.ndarray:
        while len(self.buffer) < self.buffer_size:
            ref = self._next_in_order()
            self.buffer.append(ref)
            self.held.append(self._read(ref))
        i = int(self.rng.integers(len(self.buffer)))
        tokens = self.held[i]
        self.buffer[i], self.held[i] = self.buffer[-1], self.held[-1]
        self.buffer.pop()
        self.held.pop()
        return tokens

    def snapshot(self) -> tuple:
        """The position, cheaply (the buffer's references are immutable tuples)."""
        return self.epoch, self.shard_pos, self.row_pos, list(self.buffer), self.rng.bit_generator.state

    def state_from(self, snap: tuple) -> dict[str, Any]:
        epoch, shard_pos, row_pos, buffer, rng = snap
        return {"key": self.comp.key, "epoch": epoch, "shard_pos": shard_pos, "row_pos": row_pos,
                "buffer": [list(ref) for ref in buffer], "rng": rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.shard_pos, self.row_pos = state["epoch"], state["shard_pos"], state["row_pos"]
        self.buffer = [tuple(ref) for ref in state["buffer"]]
        self.held = [None] * len(self.buffer)
        for i in sorted(range(len(self.buffer)), key=self.buffer.__getitem__):  # each row group read once
            self.held[i] = self._read(self.buffer[i])
        self.rng.bit_generator.state = state["rng"]


class PackedLoader:
    """Batches of packed windows: x, y (B, seq_len) int64, y = x shifted by one token.

    Sentences are concatenated as `[BOS] tokens [EOS]` and cut into windows of seq_len + 1
    tokens that overlap by one (no token is lost between windows); a sentence longer than
    what is left of a window continues in the next one. A step's windows are the next
    `batch_size x world_size` of the global stream; rank r gets windows [r * B, (r + 1) * B).

    `batching="task"`: task-homogeneous batches. Every `batches_per_task` global batches (one
    optimizer step of grad_accum micro-batches) draw one SOURCE/TASK component with probability
    proportional to its size in tokens ^ `task_alpha`, and all their windows pack that task alone
    (each task keeps its own carry, so no window mixes tasks).
    """

    def __init__(self, runs: list[str | Path], seq_len: int, batch_size: int, mixture: dict[str, float] | None = None,
                 shuffle_buffer: int = 1024, seed: int = 0, rank: int = 0, world_size: int = 1,
                 include_incomplete: bool = False, batching: str = "mixed", task_alpha: float = 0.5,
                 batches_per_task: int = 1, vocab_size: int | None = None):
        if batching not in ("mixed", "task"):
            raise ValueError(f"data.batching: {batching!r} is not one of mixed, task")
        self.task_batches = batching == "task"
        self.components = find_components(runs, mixture, include_incomplete, task_alpha if self.task_batches else None)
        self.batches_per_task = batches_per_task
        self.task_rng = np.random.default_rng([seed, 2])
        self.carries = [np.zeros(0, dtype=np.int64) for _ in self.components]  # task batches: one carry per task
        self.num_batches = 0  # global batches taken
        self.task = -1  # the component of the current task-homogeneous batches
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.streams = [ComponentStream(c, i, seed, shuffle_buffer) for i, c in enumerate(self.components)]
        self.weights = np.array([c.weight for c in self.components])
        self.drawn = np.zeros(len(self.components), dtype=np.int64)  # tokens drawn per component (all ranks)
        self.carry = np.zeros(0, dtype=np.int64)
        self.num_windows = 0  # windows of the global stream taken so far
        self.vocab_size = vocab_size  # when given, every sentence's ids are checked against it
        if vocab_size is not None:
            check_vocab_size(vocab_size, runs)

    def _next_window(self, task: int | None = None) -> np.ndarray:
        carry = self.carry if task is None else self.carries[task]
        pieces, length = [carry], len(carry)
        while length < self.seq_len + 1:
            # the component furthest below its share, or the batch's task
            i = int(np.argmin(self.drawn / self.weights)) if task is None else task
            tokens = self.streams[i].next()
            if self.vocab_size is not None and len(tokens) and int(tokens.max()) >= self.vocab_size:
                raise ValueError(f"model.vocab_size: {self.vocab_size}, but a sentence of {self.components[i].key} "
                                 f"holds id {int(tokens.max())}")
            sentence = np.concatenate([[BOS_ID], tokens.astype(np.int64), [EOS_ID]])
            self.drawn[i] += len(sentence)
            pieces.append(sentence)
            length += len(sentence)
        buf = np.concatenate(pieces)
        if task is None:
            self.carry = buf[self.seq_len :]
        else:
            self.carries[task] = buf[self.seq_len :]
        self.num_windows += 1
        return buf[: self.seq_len + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        task = None
        if self.task_batches:
            if self.num_batches % self.batches_per_task == 0:
                self.task = int(self.task_rng.choice(len(self.components), p=self.weights))
            task = self.task
        self.num_batches += 1
        windows = [self._next_window(task) for _ in range(self.batch_size * self.world_size)]
        mine = torch.from_numpy(np.stack(windows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]))
        return mine[:, :-1].contiguous(), mine[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def token_shares(self) -> dict[str, float]:
        """Realized share of drawn tokens per component (of the global stream)."""
        return shares_of(self.components, self.drawn)

    @property
    def batch_task(self) -> str | None:
        """The component key of the last batch in task-homogeneous batching, else None."""
        return self.components[self.task].key if self.task_batches and self.task >= 0 else None

    def snapshot(self) -> tuple:
        return (self.num_windows, self.carry, self.drawn.copy(), [s.snapshot() for s in self.streams],
                self.num_batches, self.task, list(self.carries), self.task_rng.bit_generator.state)

    def state_from(self, snap: tuple) -> dict[str, Any]:
        num_windows, carry, drawn, streams, num_batches, task, carries, task_rng = snap
        state = {"version": STATE_VERSION, "seq_len": self.seq_len, "num_windows": num_windows,
                 "carry": carry.tolist(), "drawn": drawn.tolist(),
                 "streams": [s.state_from(x) for s, x in zip(self.streams, streams)]}
        if self.task_batches:
            state["task_batches"] = {"num_batches": num_batches, "task": task, "rng": task_rng,
                                     "batches_per_task": self.batches_per_task,
                                     "carries": [c.tolist() for c in carries]}
        return state

    def state_dict(self) -> dict[str, Any]:
        return self.state_from(self.snapshot())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = [s.comp.key for s in self.streams]
        saved = [s["key"] for s in state.get("streams", [])]
        if state.get("version") != STATE_VERSION or saved != keys or state["seq_len"] != self.seq_len:
            raise ValueError(
                f"data position does not fit this data: saved version {state.get('version')}, components {saved}, "
                f"seq_len {state.get('seq_len')}; now {STATE_VERSION}, {keys}, {self.seq_len}"
            )
        if self.task_batches != ("task_batches" in state):
            raise ValueError("data.batching: the saved data position is of the other batching (mixed vs task)")
        self.num_windows = state["num_windows"]
        self.carry = np.array(state["carry"], dtype=np.int64)
        if self.task_batches:
            saved = state["task_batches"]
            if saved["batches_per_task"] != self.batches_per_task:
                raise ValueError(f"train.grad_accum: the saved position changes task every {saved['batches_per_task']} "
                                 f"batches, now every {self.batches_per_task}")
            self.num_batches, self.task = saved["num_batches"], saved["task"]
            self.carries = [np.array(c, dtype=np.int64) for c in saved["carries"]]
            self.task_rng.bit_generator.state = saved["rng"]
        self.drawn = np.array(state["drawn"], dtype=np.int64)
        for stream, s in zip(self.streams, state["streams"]):
            stream.load_state_dict(s)

    def state_json(self) -> str:
        return json.dumps(self.state_dict())


def shares_of(components: list[Component], drawn: np.ndarray) -> dict[str, float]:
    total = drawn.sum()
    return {c.key: float(n / total) if total else 0.0 for c, n in zip(components, drawn)}


class Prefetcher:
    """`loader`'s batches built `depth` ahead in a background thread, copied into pinned memory
    when `pin` (so `.to(cuda, non_blocking=True)` is a real asynchronous copy).

    `state_dict()` and `drawn` describe the position after the last batch `next_batch()`
    returned: a checkpoint resumes at the next batch the trainer would have consumed."""

    def __init__(self, loader: PackedLoader, depth: int = 4, pin: bool | None = None):
        if depth < 1:
            raise ValueError(f"data.prefetch: must be >= 1 for a Prefetcher, got {depth}")
        self.loader, self.depth = loader, depth
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.components = loader.components
        self._consumed = loader.snapshot()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wait_s = 0.0  # time next_batch() waited for the worker (the trainer's stall)

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                x, y = self.loader.next_batch()
                if self.pin:
                    x, y = x.pin_memory(), y.pin_memory()
                item = (x, y, self.loader.snapshot())
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception as err:  # handed to the trainer, which raises it
            self._queue.put(err)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="uvd-prefetch", daemon=True)
            self._thread.start()
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - start
        if isinstance(item, Exception):
            raise item
        x, y, self._consumed = item
        return x, y

    @property
    def drawn(self) -> np.ndarray:
        return self._consumed[2]

    @property
    def batch_task(self) -> str | None:
        """The task of the batch last handed out (task-homogeneous batching), else None."""
        task = self._consumed[5]
        return self.components[task].key if self.loader.task_batches and task >= 0 else None

    def token_shares(self) -> dict[str, float]:
        return shares_of(self.components, self.drawn)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_from(self._consumed)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


def iter_rows(runs: list[str | Path], want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, str, np.ndarray, dict]]:
    """As `iter_sentences`, with each row's meta: (source, task, tokens, meta dict)."""
    for run in discover_runs(runs, include_incomplete=True, field_name="--data"):
        manifest = read_manifest(run)
        for name, counts in sorted(manifest["shards"].items()):
            if want is not None and not any(want(t) for t in counts.get("by_task", {})):
                continue
            table = S.read_table(run / name, columns=["source", "task", "tokens", "meta"])
            tokens = table.column("tokens").combine_chunks()
            flat, offsets = tokens.values.to_numpy(zero_copy_only=False), tokens.offsets.to_numpy()
            cols = table.select(["source", "task", "meta"]).to_pydict()
            for i, (source, task, meta) in enumerate(zip(cols["source"], cols["task"], cols["meta"])):
                if want is None or want(task):
                    yield source, task, flat[offsets[i] : offsets[i + 1]], json.loads(meta) if meta else {}


def iter_sentences(runs: list[str | Path], want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
    """(source, task, tokens) of the sentences in the listed shards, in shard and row order; with
    `want`, only tasks it accepts (asked again per shard, so it may change), skipping other shards unread."""
    for run in discover_runs(runs, include_incomplete=True, field_name="--data"):
        manifest = read_manifest(run)
        for name, counts in sorted(manifest["shards"].items()):
            if want is not None and not any(want(t) for t in counts.get("by_task", {})):
                continue
            table = S.read_table(run / name, columns=["source", "task", "tokens"])
            tokens = table.column("tokens").combine_chunks()
            flat, offsets = tokens.values.to_numpy(zero_copy_only=False), tokens.offsets.to_numpy()
            for i, (source, task) in enumerate(zip(table.column("source").to_pylist(), table.column("task").to_pylist())):
                if want is None or want(task):
                    yield source, task, flat[offsets[i] : offsets[i + 1]]
