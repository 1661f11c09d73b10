"""Training data from the token shards: `[BOS] tokens [EOS]` per sentence, packed into windows.

Reads only the shards a run's `_manifest.json` lists. The data is split into mixture
components (a source, or `source/task` when the mixture names a task); each component is an
endless, per-epoch shuffled stream (shard order permuted, then a shuffle buffer of sentence
references), and the packer always draws from the component furthest below its weight, so the
realized token shares match the weights. Deterministic under the seed, sharded across
data-parallel ranks, and resumable at the exact window: `state_dict()` is plain JSON.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from model.config import BOS_ID, EOS_ID
from uvd.manifest import find_runs, read_manifest

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class Component:
    key: str  # "laion" or "video/video_s10"
    source: str
    tasks: set[str]  # the tasks it draws from
    shards: list[Path] = field(default_factory=list)  # listed shards that hold any of those tasks
    tokens: int = 0  # natural size: visual tokens + BOS/EOS
    weight: float = 0.0


def find_components(runs: list[str | Path], mixture: dict[str, float] | None = None) -> list[Component]:
    """Components of the data under `runs`, weighted. A component the mixture does not name
    weighs its natural token share; weights are relative; weight 0 leaves a component out."""
    mixture = dict(mixture or {})
    by_source: dict[str, dict[str, dict]] = {}  # source -> task -> {"tokens", "shards"}
    run_dirs = [run for root in runs for run in find_runs(Path(root))]
    if not run_dirs:
        raise ValueError(f"data.runs: no run folders (with a _manifest.json) under {', '.join(map(str, runs)) or '[]'}")
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
        groups = [(f"{source}/{t}", {t}) for t in sorted(tasks) if f"{source}/{t}" in mixture]
        rest = {t for t in tasks if f"{source}/{t}" not in mixture}
        if rest:
            groups.append((source, rest))
        for key, group in groups:
            tokens = sum(tasks[t]["tokens"] for t in group)
            shards = sorted({s for t in group for s in tasks[t]["shards"]})
            weight = mixture.get(key, tokens / total if total else 0.0)
            components.append(Component(key, source, group, shards, tokens, float(weight)))
    components = [c for c in components if c.weight > 0 and c.tokens > 0]
    if not components:
        raise ValueError("data.mixture: every component has weight 0 (or the runs hold no sentences)")
    norm = sum(c.weight for c in components)
    for c in components:
        c.weight /= norm
    return components


class ShardCache:
    """The last few shards read: task column and flat tokens with offsets."""

    def __init__(self, size: int = 4):
        self.size = size
        self.tables: OrderedDict[Path, tuple[list[str], np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
        if path not in self.tables:
            table = pq.read_table(path, columns=["task", "tokens"])
            tokens = table.column("tokens").combine_chunks()
            flat = tokens.values.to_numpy(zero_copy_only=False)
            self.tables[path] = (table.column("task").to_pylist(), flat, tokens.offsets.to_numpy())
            while len(self.tables) > self.size:
                self.tables.popitem(last=False)
        self.tables.move_to_end(path)
        return self.tables[path]

    def sentence(self, path: Path, row: int) -> np.ndarray:
        _, flat, offsets = self.get(path)
        return flat[offsets[row] : offsets[row + 1]]


class ComponentStream:
    """One component's endless sentence stream on one rank: (shard index, row) references."""

    def __init__(self, comp: Component, index: int, seed: int, rank: int, world_size: int, buffer_size: int,
                 cache: ShardCache):
        self.comp, self.index, self.seed = comp, index, seed
        self.rank, self.world_size, self.buffer_size, self.cache = rank, world_size, buffer_size, cache
        self.rng = np.random.default_rng([seed, index, 1])
        self.epoch, self.shard_pos, self.row_pos = 0, 0, 0
        self.buffer: list[tuple[int, int]] = []
        self._order: tuple[int, list[int]] | None = None  # (epoch, shard order), memoized
        self._rows_of: tuple[int, list[int]] | None = None  # (shard, its rows for this component and rank)

    def _shard_order(self) -> list[int]:
        if self._order is not None and self._order[0] == self.epoch:
            return self._order[1]
        order = np.random.default_rng([self.seed, self.index, 0, self.epoch]).permutation(len(self.comp.shards))
        if len(order) >= self.world_size:  # whole shards per rank
            order = order[self.rank :: self.world_size]
        # else: fewer shards than ranks, every rank reads them all and takes every world_size-th row
        self._order = (self.epoch, order.tolist())
        return self._order[1]

    def _rows(self, shard: int) -> list[int]:
        if self._rows_of is not None and self._rows_of[0] == shard:
            return self._rows_of[1]
        tasks, _, _ = self.cache.get(self.comp.shards[shard])
        rows = [i for i, t in enumerate(tasks) if t in self.comp.tasks]
        if len(self.comp.shards) < self.world_size:
            rows = rows[self.rank :: self.world_size]
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
                raise ValueError(f"data: component {self.comp.key} has no sentences for rank {self.rank} of {self.world_size}")

    def next(self) -> np.ndarray:
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._next_in_order())
        i = int(self.rng.integers(len(self.buffer)))
        shard, row = self.buffer[i]
        self.buffer[i] = self.buffer[-1]
        self.buffer.pop()
        return self.cache.sentence(self.comp.shards[shard], row)

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.comp.key, "epoch": self.epoch, "shard_pos": self.shard_pos, "row_pos": self.row_pos,
                "buffer": [list(ref) for ref in self.buffer], "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.shard_pos, self.row_pos = state["epoch"], state["shard_pos"], state["row_pos"]
        self.buffer = [tuple(ref) for ref in state["buffer"]]
        self.rng.bit_generator.state = state["rng"]


class PackedLoader:
    """Batches of packed windows: x, y (B, seq_len) int64, y = x shifted by one token.

    Sentences are concatenated as `[BOS] tokens [EOS]` and cut into windows of seq_len + 1
    tokens that overlap by one (no token is lost between windows); a sentence longer than
    what is left of a window continues in the next one.
    """

    def __init__(self, runs: list[str | Path], seq_len: int, batch_size: int, mixture: dict[str, float] | None = None,
                 shuffle_buffer: int = 1024, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.components = find_components(runs, mixture)
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        cache = ShardCache(size=4 + 3 * len(self.components))  # a shuffle buffer spans a few shards
        self.streams = [ComponentStream(c, i, seed, rank, world_size, shuffle_buffer, cache)
                        for i, c in enumerate(self.components)]
        self.weights = np.array([c.weight for c in self.components])
        self.drawn = np.zeros(len(self.components), dtype=np.int64)  # tokens drawn per component, this rank
        self.carry = np.zeros(0, dtype=np.int64)
        self.num_batches = 0

    def _next_window(self) -> np.ndarray:
        pieces, length = [self.carry], len(self.carry)
        while length < self.seq_len + 1:
            i = int(np.argmin(self.drawn / self.weights))  # the component furthest below its share
            tokens = self.streams[i].next()
            sentence = np.concatenate([[BOS_ID], tokens.astype(np.int64), [EOS_ID]])
            self.drawn[i] += len(sentence)
            pieces.append(sentence)
            length += len(sentence)
        buf = np.concatenate(pieces)
        self.carry = buf[self.seq_len :]
        return buf[: self.seq_len + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.from_numpy(np.stack([self._next_window() for _ in range(self.batch_size)]))
        self.num_batches += 1
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def token_shares(self) -> dict[str, float]:
        """Realized share of drawn tokens per component on this rank (sum the `drawn` counts over ranks for all)."""
        total = self.drawn.sum()
        return {c.key: float(n / total) if total else 0.0 for c, n in zip(self.components, self.drawn)}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size, "seq_len": self.seq_len,
                "num_batches": self.num_batches, "carry": self.carry.tolist(), "drawn": self.drawn.tolist(),
                "streams": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = [s.comp.key for s in self.streams]
        saved = [s["key"] for s in state["streams"]]
        if state["version"] != STATE_VERSION or saved != keys or state["world_size"] != self.world_size \
                or state["seq_len"] != self.seq_len:
            raise ValueError(
                f"data position does not fit this data: saved components {saved}, world size {state['world_size']}, "
                f"seq_len {state['seq_len']}; now {keys}, {self.world_size}, {self.seq_len}"
            )
        self.num_batches = state["num_batches"]
        self.carry = np.array(state["carry"], dtype=np.int64)
        self.drawn = np.array(state["drawn"], dtype=np.int64)
        for stream, s in zip(self.streams, state["streams"]):
            stream.load_state_dict(s)

    def state_json(self) -> str:
        return json.dumps(self.state_dict())


def iter_sentences(runs: list[str | Path], want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
    """(source, task, tokens) of the sentences in the listed shards, in shard and row order; with
    `want`, only tasks it accepts (asked again per shard, so it may change), skipping other shards unread."""
    for root in runs:
        for run in find_runs(Path(root)):
            manifest = read_manifest(run)
            for name, counts in sorted(manifest["shards"].items()):
                if want is not None and not any(want(t) for t in counts.get("by_task", {})):
                    continue
                table = pq.read_table(run / name, columns=["source", "task", "tokens"])
                tokens = table.column("tokens").combine_chunks()
                flat, offsets = tokens.values.to_numpy(zero_copy_only=False), tokens.offsets.to_numpy()
                for i, (source, task) in enumerate(zip(table.column("source").to_pylist(), table.column("task").to_pylist())):
                    if want is None or want(task):
                        yield source, task, flat[offsets[i] : offsets[i + 1]]
