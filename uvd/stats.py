"""Dataset statistics from the shards and manifests alone: per source and task, sentences,
images, tokens and token share; rejections by reason.

    uvd stats out/            # one run folder, or a parent folder of several runs (summed)
    uvd stats out/ --json     # the layout of SPEC.md's output contract
    uvd stats out/ --codebook # plus code usage per source (histogram, perplexity, dead codes); reads the tokens
    uvd stats out/ --verify   # plus every shard's size and checksum against the run's record
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from uvd import layout as L
from uvd import storage as S
from uvd import manifest as M


def _counter() -> dict[str, int]:
    return {"sentences": 0, "images": 0, "tokens": 0}


def compute_stats(root: str | Path, codebook: bool = False, verify: bool = False) -> dict[str, Any]:
    """Counts from the manifests (and the write records of unfinished runs), never the token
    columns; with `codebook`, also `by_source[NAME]["codebook"]` and a `codebook` total (uvd.audit's
    codebook_stats of the visual ids), which reads every token; with `verify`, every listed shard's
    size and checksum are checked (`damaged` lists the ones that fail)."""
    root = S.as_path(root)  # a local folder or an object-store URI
    runs = M.find_runs(root)
    if not runs:
        raise ValueError(f"{root}: no UVD run here (no {M.MANIFEST} at or below it)")
    totals = {**_counter(), "rejected": 0}
    by_source: dict[str, dict[str, Any]] = {}
    by_reason: Counter[str] = Counter()
    run_info = []
    damaged: list[dict[str, str]] = []
    for run in runs:
        manifest = M.read_manifest(run)
        shards, rejects = M.run_index(run, manifest)
        run_info.append(
            {
                "path": S.relative(run, root),
                "source": manifest["source"],
                "status": manifest["status"],
                "shards": len(shards),
                "tokenizer": manifest.get("tokenizer", {}).get("id"),
            }
        )
        for name, counts in sorted(shards.items()):
            path = L.checked_name(run, name, "shard")
            if not path.is_file():
                raise L.CorruptRunError(path, "a shard the run lists is missing; rerun `uvd run` with the same recipe "
                                              "and --out to redo its part")
            if verify:
                problem = _verify_shard(path, counts)
                if problem:
                    damaged.append(problem)
            for task, c in counts.get("by_task", {}).items():
                source = manifest["source"]
                entry = by_source.setdefault(source, {**_counter(), "tasks": {}, "rejected": 0, "rejected_by_reason": {}})
                task_entry = entry["tasks"].setdefault(task, _counter())
                for target in (totals, entry, task_entry):
                    for k in ("sentences", "images", "tokens"):
                        target[k] += c[k]
        for name in rejects.get("files", []):
            if not L.checked_name(run, name, "rejects").is_file():
                raise L.CorruptRunError(run / name, "a rejects file the run lists is missing; rerun `uvd run` with the "
                                                    "same recipe and --out to rewrite it")
        entry = by_source.setdefault(manifest["source"], {**_counter(), "tasks": {}, "rejected": 0, "rejected_by_reason": {}})
        for reason, count in rejects.get("by_reason", {}).items():
            entry["rejected_by_reason"][reason] = entry["rejected_by_reason"].get(reason, 0) + count
            by_reason[reason] += count
        entry["rejected"] += rejects.get("count", 0)
        totals["rejected"] += rejects.get("count", 0)
    all_tokens = max(totals["tokens"], 1)
    for entry in by_source.values():
        entry["token_share"] = entry["tokens"] / all_tokens
        for task_entry in entry["tasks"].values():
            task_entry["token_share"] = task_entry["tokens"] / all_tokens
    stats = {
        "root": str(root),
        "runs": run_info,
        "totals": totals,
        "by_source": dict(sorted(by_source.items())),
        "rejected_by_reason": dict(sorted(by_reason.items())),
    }
    if verify:
        stats["damaged"] = damaged
    if codebook:
        add_codebook_stats(stats, root)
    return stats


def _verify_shard(path: Path, counts: dict[str, Any]) -> dict[str, str] | None:
    import hashlib

    if not path.is_file():
        return {"shard": str(path), "problem": "missing"}
    data = path.read_bytes()
    if "bytes" in counts and len(data) != counts["bytes"]:
        return {"shard": str(path), "problem": f"{len(data)} bytes, the run recorded {counts['bytes']}"}
    if "sha256" in counts and hashlib.sha256(data).hexdigest() != counts["sha256"]:
        return {"shard": str(path), "problem": "checksum differs from the recorded one"}
    return None


def add_codebook_stats(stats: dict[str, Any], root: str | Path) -> None:
    """Code usage per source and in total, counted by the audit's shard pass (no samples kept)."""
    import numpy as np

    from uvd.audit import CODEBOOK_SIZE, codebook_stats, collect

    partial, _ = collect(root, num_samples=0, use_ray=False)
    total = np.zeros(CODEBOOK_SIZE, np.int64)
    for name, source_stats in partial.sources.items():
        total += source_stats.codes
        if name in stats["by_source"]:
            stats["by_source"][name]["codebook"] = _codebook_summary(codebook_stats(source_stats.codes))
    stats["codebook"] = _codebook_summary(codebook_stats(total))


def _codebook_summary(book: dict[str, Any]) -> dict[str, Any]:
    keep = ("codebook_size", "tokens", "used_codes", "dead_codes", "dead_share", "perplexity",
            "normalized_perplexity", "use_hist", "top_codes")
    return {k: book[k] for k in keep}


def _format_codebook(stats: dict[str, Any]) -> list[str]:
    rows = [(name, e["codebook"]) for name, e in stats["by_source"].items() if "codebook" in e]
    rows.append(("total", stats["codebook"]))
    w = max(len("source"), *(len(n) for n, _ in rows)) + 2
    header = f"{'source':<{w}}{'tokens':>13}{'used codes':>12}{'dead':>8}{'perplexity':>12}  codes by times used"
    lines = ["", f"codebook usage ({stats['codebook']['codebook_size']} codes)", header, "-" * len(header)]
    for name, book in rows:
        edges, counts = book["use_hist"]["edges"], book["use_hist"]["counts"]
        hist = " ".join(f"{_edge_label(edges, i)}:{c}" for i, c in enumerate(counts) if c)
        lines.append(f"{name:<{w}}{book['tokens']:>13,}{book['used_codes']:>12,}{book['dead_share']:>8.1%}"
                     f"{book['perplexity']:>12.1f}  {hist}")
    return lines


def _edge_label(edges: list, i: int) -> str:
    lo = int(edges[i])
    if i + 1 == len(edges):
        return f"{lo}+"
    hi = int(edges[i + 1]) - 1
    return str(lo) if hi == lo else f"{lo}-{hi}"


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"{len(stats['runs'])} run(s) under {stats['root']}"]
    for run in stats["runs"]:
        if run["status"] != "complete":
            lines.append(f"  ! {run['path']}: status {run['status']} (only its finished shards are counted)")
    for bad in stats.get("damaged", []):
        lines.append(f"  ! damaged shard {bad['shard']}: {bad['problem']} (rerun `uvd run` with the same recipe and "
                     "--out: only its part is redone)")
    w = max([len("source"), *(len(n) for n in stats["by_source"])]) + 2
    tw = max([len("task"), *(len(t) for e in stats["by_source"].values() for t in e["tasks"])]) + 2
    header = f"{'source':<{w}}{'task':<{tw}}{'sentences':>11}{'images':>11}{'tokens':>15}{'share':>9}"
    lines += ["", header, "-" * len(header)]
    for source, entry in stats["by_source"].items():
        for task, t in sorted(entry["tasks"].items()):
            lines.append(
                f"{source:<{w}}{task:<{tw}}{t['sentences']:>11,}{t['images']:>11,}{t['tokens']:>15,}{t['token_share']:>9.1%}"
            )
        if len(entry["tasks"]) > 1:
            lines.append(
                f"{source:<{w}}{'(all)':<{tw}}{entry['sentences']:>11,}{entry['images']:>11,}{entry['tokens']:>15,}"
                f"{entry['token_share']:>9.1%}"
            )
    t = stats["totals"]
    lines += ["-" * len(header), f"{'total':<{w + tw}}{t['sentences']:>11,}{t['images']:>11,}{t['tokens']:>15,}{1:>9.1%}", ""]
    lines.append(f"rejected inputs: {t['rejected']:,}")
    for source, entry in stats["by_source"].items():
        for reason, count in sorted(entry["rejected_by_reason"].items()):
            lines.append(f"  {source:<{w}}{reason:<24}{count:>9,}")
    if "codebook" in stats:
        lines += _format_codebook(stats)
    return "\n".join(lines)


def stats_json(stats: dict[str, Any]) -> str:
    return json.dumps(stats, indent=2)
