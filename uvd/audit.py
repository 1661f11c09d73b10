"""Data-mix audit: one streaming pass over the shards of one run or a folder of runs.

    uvd audit out/ [--target recipes/mixes/uvdv1.yaml] [--out report.html] [--json]

Each shard (and each run's rejects file) becomes an `AuditPartial` of fixed-size, mergeable
counters, computed by a plain function (in-process, or as Ray tasks for large folders) and
merged; memory does not grow with the dataset. `audit_json` lays the numbers out (README).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow.compute as pc

from uvd import layout as L
from uvd import manifest as M
from uvd import storage as S
from uvd.config import read_yaml
from uvd.records import reason_meaning

log = logging.getLogger(__name__)

CODEBOOK_SIZE = 8192  # SPEC.md: visual ids 0-8191
RAY_MIN_SHARDS = 64  # above this many shards the pass runs as Ray tasks
# Fixed histogram bins (input sizes before preprocessing): shorter side in pixels, aspect = w / h.
SIDE_EDGES = [0, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 4096]
ASPECT_EDGES = [0, 1 / 3, 1 / 2, 2 / 3, 3 / 4, 9 / 10, 10 / 9, 4 / 3, 3 / 2, 2, 3]
# Code-use histogram: how many codes were used n times, n in [edge_i, edge_i+1).
USE_EDGES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536]
# Meta keys that describe a sentence's structure (frames, strides, views, annotations).
STRUCTURE_KEYS = ("k", "stride", "strides", "frame_stride", "num_frames", "views", "num_views", "annotation",
                  "annotation_type", "annotations", "layout")
MAX_META_VALUES = 24  # distinct values kept per structure key; the rest count as "(other)"
NUM_EXAMPLES = 3  # example inputs kept per reject reason


def _zeros_counts() -> dict[str, int]:
    return {"sentences": 0, "images": 0, "tokens": 0}


@dataclass
class SourceStats:
    """Everything counted for one source; all fields are fixed-size or bounded by the task count."""

    tasks: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> sentences/images/tokens
    num_images: dict[str, Counter] = field(default_factory=dict)  # task -> Counter(num_images)
    meta_keys: Counter = field(default_factory=Counter)  # key -> sentences having it
    meta_values: dict[str, Counter] = field(default_factory=dict)  # structure key -> Counter(value as str)
    side_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(SIDE_EDGES), np.int64))
    aspect_hist: np.ndarray = field(default_factory=lambda: np.zeros(len(ASPECT_EDGES), np.int64))
    codes: np.ndarray = field(default_factory=lambda: np.zeros(CODEBOOK_SIZE, np.int64))
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    reject_examples: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    # A uniform, mergeable sample: the sentences whose ids hash lowest (bottom-k), as (hash, row).
    samples: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def merge(self, other: SourceStats, num_samples: int) -> SourceStats:
        for task, counts in other.tasks.items():
            mine = self.tasks.setdefault(task, _zeros_counts())
            for k, v in counts.items():
                mine[k] += v
        for task, counter in other.num_images.items():
            self.num_images.setdefault(task, Counter()).update(counter)
        self.meta_keys.update(other.meta_keys)
        for key, counter in other.meta_values.items():
            _add_capped(self.meta_values.setdefault(key, Counter()), counter)
        self.side_hist += other.side_hist
        self.aspect_hist += other.aspect_hist
        self.codes += other.codes
        self.rejected.update(other.rejected)
        for reason, examples in other.reject_examples.items():
            mine = self.reject_examples.setdefault(reason, [])
            mine.extend(examples[: NUM_EXAMPLES - len(mine)])
        self.samples = sorted(self.samples + other.samples, key=lambda s: s[0])[:num_samples]
        return self


def _add_capped(counter: Counter, other: Counter) -> None:
    for value, n in other.items():
        if value in counter or len(counter) < MAX_META_VALUES:
            counter[value] += n
        else:
            counter["(other)"] += n


@dataclass
class AuditPartial:
    """Mergeable audit counters of some shards: merge(a, b) is the same as counting a's and b's shards at once."""

    sources: dict[str, SourceStats] = field(default_factory=dict)
    num_samples: int = 2  # sample sentences kept per source (uniform: lowest hash of the sentence id)
    shards: int = 0

    def source(self, name: str) -> SourceStats:
        return self.sources.setdefault(name, SourceStats())

    def merge(self, other: AuditPartial) -> AuditPartial:
        for name, stats in other.sources.items():
            self.source(name).merge(stats, self.num_samples)
        self.shards += other.shards
        return self


def shard_partial(path: str, run: str = "", num_samples: int = 2, batch_rows: int = 1024) -> AuditPartial:
    """Count one shard, `batch_rows` rows at a time (memory bounded by one batch)."""
    partial = AuditPartial(num_samples=num_samples, shards=1)
    shard = S.as_path(path).name
    row_index = 0
    columns = ["id", "source", "task", "num_images", "tokens", "images", "meta"]
    for batch in S.parquet_file(S.as_path(path)).iter_batches(batch_size=batch_rows, columns=columns):
        tokens = batch.column("tokens")
        flat = pc.list_flatten(tokens).to_numpy(zero_copy_only=False).astype(np.int64)
        offsets = tokens.offsets.to_numpy()
        offsets = offsets - offsets[0]
        cols = batch.select(["id", "source", "task", "num_images", "meta"]).to_pydict()
        rows = zip(cols["id"], cols["source"], cols["task"], cols["num_images"], cols["meta"])
        for i, (sentence_id, name, task, num_images, meta_text) in enumerate(rows):
            stats = partial.source(name)
            row_tokens = flat[offsets[i] : offsets[i + 1]]
            counts = stats.tasks.setdefault(task, _zeros_counts())
            counts["sentences"] += 1
            counts["images"] += num_images
            counts["tokens"] += len(row_tokens)
            stats.num_images.setdefault(task, Counter())[num_images] += 1
            stats.codes += np.bincount(row_tokens[row_tokens < CODEBOOK_SIZE], minlength=CODEBOOK_SIZE)
            meta = json.loads(meta_text) if meta_text else {}
            _count_meta(stats, meta)
            rank = hashlib.sha256(sentence_id.encode()).hexdigest()
            if num_samples and (len(stats.samples) < num_samples or rank < stats.samples[-1][0]):
                stats.samples.append((rank, {
                    "run": run, "shard": shard, "row": row_index + i, "task": task, "num_images": num_images,
                    "tokens": row_tokens.astype(np.uint16), "images": batch.column("images")[i].as_py(),
                }))
                stats.samples = sorted(stats.samples, key=lambda s: s[0])[:num_samples]
        row_index += batch.num_rows
    return partial


def _count_meta(stats: SourceStats, meta: dict[str, Any]) -> None:
    stats.meta_keys.update(meta.keys())
    for key in STRUCTURE_KEYS:
        if key in meta:
            values = meta[key] if isinstance(meta[key], list) else [meta[key]]
            _add_capped(stats.meta_values.setdefault(key, Counter()), Counter(json.dumps(v) if not isinstance(v, str) else v for v in values))
    for width, height in meta.get("image_sizes", []):
        if width > 0 and height > 0:
            stats.side_hist[np.searchsorted(SIDE_EDGES, min(width, height), side="right") - 1] += 1
            stats.aspect_hist[np.searchsorted(ASPECT_EDGES, width / height, side="right") - 1] += 1


def rejects_partial(path: str, source: str) -> AuditPartial:
    """Count one run's rejects file: reasons, and the first few example inputs per reason."""
    partial = AuditPartial(shards=0)
    stats = partial.source(source)
    for batch in S.parquet_file(S.as_path(path)).iter_batches(batch_size=4096, columns=["unit", "key", "reason", "detail"]):
        cols = batch.to_pydict()
        for unit, key, reason, detail in zip(cols["unit"], cols["key"], cols["reason"], cols["detail"]):
            stats.rejected[reason] += 1
            examples = stats.reject_examples.setdefault(reason, [])
            if len(examples) < NUM_EXAMPLES:
                examples.append({"unit": unit or "", "key": key or "", "detail": (detail or "")[:200]})
    return partial


# ---------------------------------------------------------------- the pass


def collect(root: str | Path, num_samples: int = 2, use_ray: bool | None = None, address: str | None = None,
            include_incomplete: bool = False) -> tuple[AuditPartial, list[dict]]:
    """-> (merged counters of every listed shard and rejects file under `root`, run descriptions)."""
    root = S.as_path(root)  # a local folder or an object-store URI
    runs = M.find_runs(root)
    if not runs:
        raise ValueError(f"{root}: no UVD run here (no {M.MANIFEST} at or below it)")
    jobs: list[tuple[str, tuple]] = []
    run_info = []
    for run in runs:
        manifest = M.read_manifest(run)
        rel = S.relative(run, root)
        if manifest["status"] != "complete" and not include_incomplete:
            log.warning("audit: skipping %s: its status is %s (pass --include-incomplete to count its finished parts)",
                        run, manifest["status"])
            continue
        shards, rejects = M.run_index(run, manifest)
        run_info.append({"path": rel, "dir": str(run), "source": manifest["source"], "status": manifest["status"],
                         "shards": len(shards), "tokenizer": manifest.get("tokenizer", {})})
        for name in sorted(shards):
            path = L.checked_name(run, name, "shard")
            if not path.is_file():
                raise L.CorruptRunError(path, "a shard the run lists is missing; rerun `uvd run` with the same recipe "
                                              "and --out to redo its part")
            jobs.append(("shard", (str(path), rel, num_samples)))
        for name in rejects.get("files", []):
            path = L.checked_name(run, name, "rejects")
            if not path.is_file():
                raise L.CorruptRunError(path, "a rejects file the run lists is missing; rerun `uvd run` with the same "
                                              "recipe and --out to rewrite it")
            jobs.append(("rejects", (str(path), manifest["source"])))
    if not run_info:
        raise ValueError(f"{root}: no complete UVD run here (use --include-incomplete for running or failed runs)")
    functions = {"shard": shard_partial, "rejects": rejects_partial}
    total = AuditPartial(num_samples=num_samples)
    num_shards = sum(kind == "shard" for kind, _ in jobs)
    if use_ray or (use_ray is None and num_shards > RAY_MIN_SHARDS):
        for partial in _ray_partials(jobs, functions, address):
            total.merge(partial)
    else:
        for kind, args in jobs:
            total.merge(functions[kind](*args))
    return total, run_info


def _ray_partials(jobs: list[tuple[str, tuple]], functions: dict, address: str | None) -> Iterable[AuditPartial]:
    import ray

    from uvd.runtime import ray_session

    with ray_session(address):
        remote = {kind: ray.remote(num_cpus=1)(fn) for kind, fn in functions.items()}
        pending = [remote[kind].remote(*args) for kind, args in jobs]
        log.info("audit: %d Ray tasks", len(pending))
        while pending:  # merge as tasks finish: only finished partials are held
            done, pending = ray.wait(pending, num_returns=min(len(pending), 16))
            yield from ray.get(done)


# ---------------------------------------------------------------- the target mix


def load_target(path: str | Path) -> dict[str, Any]:
    """A target mix file (recipes/mixes/*.yaml) -> {name, tolerance, sections: {kind: [entry]}}.

    Sections: `categories` (a list of {name, share, match: ["SOURCE/TASK" globs]}), `sources`
    ({source: share}) and `tasks` ({task: share}); an entry may set its own `tolerance`.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--target: {path} does not exist")
    data = read_yaml(path, "target mix") or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a target mix is a mapping with tolerance and categories/sources/tasks")
    unknown = set(data) - {"name", "description", "tolerance", "categories", "sources", "tasks"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; known: name, tolerance, categories, sources, tasks")
    tolerance = data.get("tolerance", 0.02)
    if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"{path}: tolerance must be a share in [0, 1) (absolute drift of a token share), got {tolerance!r}")
    sections: dict[str, list[dict[str, Any]]] = {}
    for key, kind in (("categories", list), ("sources", dict), ("tasks", dict)):
        if not isinstance(data.get(key) or kind(), kind):
            raise ValueError(f"{path}: {key}: expected a {'list of {name, share, match}' if kind is list else 'mapping of NAME: share'}, "
                             f"got {data[key]!r}")
    for i, entry in enumerate(data.get("categories") or []):
        if not isinstance(entry, dict) or not {"name", "share", "match"} <= set(entry):
            raise ValueError(f"{path}: categories[{i}] needs name, share and match (a list of SOURCE/TASK globs)")
        match = [entry["match"]] if isinstance(entry["match"], str) else list(entry["match"])
        sections.setdefault("category", []).append(_entry(path, entry["name"], entry["share"], match, entry.get("tolerance", tolerance)))
    for kind, key, pattern in (("source", "sources", "{}/*"), ("task", "tasks", "*/{}")):
        for name, value in (data.get(key) or {}).items():
            share, tol = (value.get("share"), value.get("tolerance", tolerance)) if isinstance(value, dict) else (value, tolerance)
            sections.setdefault(kind, []).append(_entry(path, str(name), share, [pattern.format(name)], tol))
    if not sections:
        raise ValueError(f"{path}: give at least one of categories, sources, tasks")
    for kind, entries in sections.items():
        if sum(e["share"] for e in entries) > 1.001:
            raise ValueError(f"{path}: the {kind} shares add up to more than 1")
    return {"name": data.get("name", path.stem), "path": str(path), "tolerance": tolerance, "sections": sections}


def _entry(path: Path, name: str, share: Any, match: list[str], tolerance: Any) -> dict[str, Any]:
    if not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise ValueError(f"{path}: share of {name!r} must be a number in [0, 1], got {share!r}")
    if not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"{path}: tolerance of {name!r} must be a share in [0, 1), got {tolerance!r}")
    return {"name": name, "share": float(share), "match": match, "tolerance": float(tolerance)}


def compare_to_target(task_tokens: dict[str, int], target: dict[str, Any]) -> dict[str, Any]:
    """task_tokens: {"source/task": tokens}. Each (source, task) counts for the first entry that matches it;
    what no entry matches is the "(unmatched)" row, whose target is what the listed shares leave over."""
    total = max(sum(task_tokens.values()), 1)
    sections = {}
    for kind, entries in target["sections"].items():
        rows, left = [], set(task_tokens)
        for entry in entries:
            members = sorted(k for k in left if any(fnmatch.fnmatchcase(k, p) for p in entry["match"]))
            left -= set(members)
            rows.append(_drift_row(entry["name"], entry["share"], entry["tolerance"], members, task_tokens, total))
        rest = max(0.0, 1.0 - sum(e["share"] for e in entries))
        if left or rest > 0.005:
            rows.append(_drift_row("(unmatched)", rest, target["tolerance"], sorted(left), task_tokens, total))
        sections[kind] = rows
    drifted = [f"{kind}:{row['name']}" for kind, rows in sections.items() for row in rows if row["flagged"]]
    return {"name": target["name"], "path": target["path"], "tolerance": target["tolerance"],
            "sections": sections, "drifted": drifted, "ok": not drifted}


def _drift_row(name: str, share: float, tolerance: float, members: list[str], task_tokens: dict[str, int], total: int) -> dict[str, Any]:
    actual = sum(task_tokens[m] for m in members) / total
    drift = actual - share
    return {"name": name, "target_share": share, "actual_share": actual, "drift": drift, "tolerance": tolerance,
            "flagged": abs(drift) > tolerance + 1e-12, "members": members}


# ---------------------------------------------------------------- the numbers


def _hist(edges: list[float], counts: np.ndarray) -> dict[str, list]:
    return {"edges": [round(e, 4) for e in edges], "counts": [int(c) for c in counts]}


def codebook_stats(codes: np.ndarray, codebook_size: int = CODEBOOK_SIZE) -> dict[str, Any]:
    """Use of the codebook by `codes` (counts per id): dead codes, perplexity of the code distribution."""
    codes = codes[:codebook_size]
    num_tokens = int(codes.sum())
    p = codes[codes > 0] / max(num_tokens, 1)
    perplexity = float(np.exp(-(p * np.log(p)).sum())) if num_tokens else 0.0
    use_hist = np.zeros(len(USE_EDGES), np.int64)
    np.add.at(use_hist, np.searchsorted(USE_EDGES, codes, side="right") - 1, 1)
    top = np.argsort(-codes, kind="stable")[:10]
    return {
        "codebook_size": codebook_size,
        "tokens": num_tokens,
        "used_codes": int((codes > 0).sum()),
        "dead_codes": int((codes == 0).sum()),
        "dead_share": float((codes == 0).mean()),
        "perplexity": perplexity,
        "normalized_perplexity": perplexity / codebook_size,
        "use_hist": _hist(USE_EDGES, use_hist),
        "top_codes": [[int(c), int(codes[c])] for c in top if codes[c] > 0],
        "sorted_counts": _rank_profile(codes),
    }


def _rank_profile(codes: np.ndarray, points: int = 64) -> list[int]:
    """Code counts sorted high to low, sampled at `points` ranks (the rank-frequency curve)."""
    ranked = np.sort(codes)[::-1]
    return [int(ranked[i]) for i in np.linspace(0, len(ranked) - 1, points).astype(int)]


def audit_json(total: AuditPartial, runs: list[dict], root: str | Path, target: dict | None = None) -> dict[str, Any]:
    """The audit's numbers as one JSON-ready dict (layout in README, "Auditing the mix")."""
    all_tokens = max(sum(t["tokens"] for s in total.sources.values() for t in s.tasks.values()), 1)
    totals = {**_zeros_counts(), "rejected": 0, "shards": total.shards}
    by_source, by_task, by_reason = {}, {}, Counter()
    all_codes = np.zeros(CODEBOOK_SIZE, np.int64)
    side, aspect = np.zeros(len(SIDE_EDGES), np.int64), np.zeros(len(ASPECT_EDGES), np.int64)
    task_tokens = {}
    for name, s in sorted(total.sources.items()):
        entry = {**_zeros_counts(), "tasks": {}}
        for task, counts in sorted(s.tasks.items()):
            hist = {str(k): v for k, v in sorted(s.num_images[task].items())}
            entry["tasks"][task] = {**counts, "token_share": counts["tokens"] / all_tokens, "num_images_hist": hist}
            t = by_task.setdefault(task, {**_zeros_counts(), "sources": []})
            t["sources"].append(name)
            task_tokens[f"{name}/{task}"] = counts["tokens"]
            for k in ("sentences", "images", "tokens"):
                entry[k] += counts[k]
                t[k] += counts[k]
                totals[k] += counts[k]
        entry["token_share"] = entry["tokens"] / all_tokens
        entry["images_per_sentence"] = entry["images"] / entry["sentences"] if entry["sentences"] else 0.0
        entry["structure"] = {"meta_keys": dict(sorted(s.meta_keys.items())),
                              "meta_values": {k: dict(v.most_common()) for k, v in sorted(s.meta_values.items())}}
        entry["rejected"] = sum(s.rejected.values())
        entry["rejected_by_reason"] = {r: {"count": n, "meaning": reason_meaning(r), "examples": s.reject_examples.get(r, [])}
                                       for r, n in sorted(s.rejected.items())}
        entry["input_sizes"] = {"images": int(s.side_hist.sum()), "short_side_hist": _hist(SIDE_EDGES, s.side_hist),
                                "aspect_hist": _hist(ASPECT_EDGES, s.aspect_hist)}
        entry["codebook"] = codebook_stats(s.codes) if s.codes.any() else None
        by_source[name] = entry
        totals["rejected"] += entry["rejected"]
        by_reason.update(s.rejected)
        all_codes += s.codes
        side += s.side_hist
        aspect += s.aspect_hist
    for t in by_task.values():
        t["token_share"] = t["tokens"] / all_tokens
    comparison = compare_to_target(task_tokens, target) if target else None
    return {
        "root": str(root),
        "runs": [{k: v for k, v in r.items() if k != "dir"} | {"tokenizer": {k: r["tokenizer"].get(k) for k in ("id", "trained")}}
                 for r in runs],
        "totals": totals,
        "by_source": by_source,
        "by_task": dict(sorted(by_task.items())),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "input_sizes": {"images": int(side.sum()), "short_side_hist": _hist(SIDE_EDGES, side), "aspect_hist": _hist(ASPECT_EDGES, aspect)},
        "codebook": codebook_stats(all_codes) if all_codes.any() else None,
        "target": comparison,
        "drift_exceeded": bool(comparison and not comparison["ok"]),
    }


def run_audit(root: str | Path, target_path: str | Path | None = None, num_samples: int = 2,
              use_ray: bool | None = None, address: str | None = None,
              include_incomplete: bool = False) -> tuple[dict[str, Any], AuditPartial, list[dict]]:
    """-> (the JSON numbers, the merged counters (for the sample strips), the runs)."""
    target = load_target(target_path) if target_path else None
    total, runs = collect(root, num_samples=num_samples, use_ray=use_ray, address=address,
                          include_incomplete=include_incomplete)
    return audit_json(total, runs, root, target), total, runs
