"""Dataset statistics from the shards and manifests alone: per source and task, sentences,
images, tokens and token share; rejections by reason.

    uvd stats out/            # one run folder, or a parent folder of several runs (summed)
    uvd stats out/ --json     # the layout of SPEC.md's output contract
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from uvd import manifest as M


def _counter() -> dict[str, int]:
    return {"sentences": 0, "images": 0, "tokens": 0}


def compute_stats(root: str | Path) -> dict[str, Any]:
    root = Path(root)
    runs = M.find_runs(root)
    if not runs:
        raise ValueError(f"{root}: no UVD run here (no {M.MANIFEST} at or below it)")
    totals = {**_counter(), "rejected": 0}
    by_source: dict[str, dict[str, Any]] = {}
    by_reason: Counter[str] = Counter()
    run_info = []
    for run in runs:
        manifest = M.read_manifest(run)
        run_info.append(
            {
                "path": str(run.relative_to(root)) if run != root else ".",
                "source": manifest["source"],
                "status": manifest["status"],
                "shards": len(manifest["shards"]),
                "tokenizer": manifest.get("tokenizer", {}).get("id"),
            }
        )
        for shard in sorted(manifest["shards"]):
            table = pq.read_table(run / shard, columns=["source", "task", "num_images", "tokens"])
            lengths = pc.list_value_length(table.column("tokens")).to_numpy(zero_copy_only=False)
            columns = table.select(["source", "task", "num_images"]).to_pydict()
            for source, task, num_images, num_tokens in zip(columns["source"], columns["task"], columns["num_images"], lengths):
                entry = by_source.setdefault(source, {**_counter(), "tasks": {}, "rejected": 0, "rejected_by_reason": {}})
                task_entry = entry["tasks"].setdefault(task, _counter())
                for counts in (totals, entry, task_entry):
                    counts["sentences"] += 1
                    counts["images"] += num_images
                    counts["tokens"] += int(num_tokens)
        rejects_path = run / M.REJECTS_FILE
        if rejects_path.is_file():
            reasons = Counter(pq.read_table(rejects_path, columns=["reason"]).column("reason").to_pylist())
            entry = by_source.setdefault(manifest["source"], {**_counter(), "tasks": {}, "rejected": 0, "rejected_by_reason": {}})
            for reason, count in reasons.items():
                entry["rejected_by_reason"][reason] = entry["rejected_by_reason"].get(reason, 0) + count
            entry["rejected"] += sum(reasons.values())
            by_reason.update(reasons)
            totals["rejected"] += sum(reasons.values())
    all_tokens = max(totals["tokens"], 1)
    for entry in by_source.values():
        entry["token_share"] = entry["tokens"] / all_tokens
        for task_entry in entry["tasks"].values():
            task_entry["token_share"] = task_entry["tokens"] / all_tokens
    return {
        "root": str(root),
        "runs": run_info,
        "totals": totals,
        "by_source": dict(sorted(by_source.items())),
        "rejected_by_reason": dict(sorted(by_reason.items())),
    }


def format_stats(stats: dict[str, Any]) -> str:
    lines = [f"{len(stats['runs'])} run(s) under {stats['root']}"]
    for run in stats["runs"]:
        if run["status"] != "complete":
            lines.append(f"  ! {run['path']}: status {run['status']} (only its finished shards are counted)")
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
    return "\n".join(lines)


def stats_json(stats: dict[str, Any]) -> str:
    return json.dumps(stats, indent=2)
