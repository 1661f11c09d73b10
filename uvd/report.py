"""The audit as one self-contained HTML page: tables, inline SVG charts and decoded sample
strips as PNG data URIs (no scripts, no external URLs; opens offline in any browser).

    uvd audit out/ --target recipes/mixes/uvdv1.yaml --out report.html
"""
from __future__ import annotations

import base64
import io
import json
import logging
import re
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from uvd.audit import ASPECT_EDGES, SIDE_EDGES, USE_EDGES, AuditPartial
from uvd.records import TOKENS_PER_IMAGE
from uvd.registry import plugin
from uvd.report_svg import histogram, rank_curve, share_bars

log = logging.getLogger(__name__)

THUMB = 96  # px, side of a decoded image in the sample strip

CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1150px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.flag td{background:#fbe3e0}
.warn{background:#fff4d6;border:1px solid #e0c060;padding:8px 12px;margin:8px 0}
.bad{background:#fbe3e0;border:1px solid #c0392b;padding:8px 12px;margin:8px 0}
.ok{background:#e3f4e3;border:1px solid #5a5;padding:8px 12px;margin:8px 0}
.row{display:flex;flex-wrap:wrap;gap:16px}.strip{display:flex;flex-wrap:wrap;gap:2px;margin:4px 0 12px}
.strip img{width:%dpx;height:%dpx;image-rendering:pixelated}.muted{color:#777;font-size:12px}code{font-size:12px}""" % (THUMB, THUMB)


def _table(header: list[str], rows: list[list[Any]], left: int = 1, flags: list[bool] | None = None) -> str:
    """The first `left` columns, and text that is not a number, align left."""
    first = rows[0] if rows else []
    head = "".join(f'<th class="{"l" if i < left or (i < len(first) and _is_text(first[i])) else ""}">{escape(h)}</th>'
                   for i, h in enumerate(header))
    body = []
    for r, row in enumerate(rows):
        cls = ' class="flag"' if flags and flags[r] else ""
        cells = "".join(f'<td class="{"l" if i < left or _is_text(v) else ""}">{_fmt(v)}</td>' for i, v in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return escape(str(value if value is not None else "–"))
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}"
    return escape(str(value))


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and not re.fullmatch(r"[+-]?[\d,.]+%?|–", value)


def _pct(x: float) -> str:
    return f"{x:.2%}" if abs(x) >= 0.0001 or x == 0 else f"{x:.4%}"


def _bin_labels(edges: list[float], fmt: str) -> list[str]:
    return [f"{fmt.format(a)}–{fmt.format(b)}" for a, b in zip(edges, edges[1:])] + [f"≥{fmt.format(edges[-1])}"]


# ---------------------------------------------------------------- sample strips


def decode_samples(total: AuditPartial, runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Decode each source's sample sentences with its run's tokenizer -> {source: {note, sentences}}."""
    run_dirs = {r["path"]: r for r in runs}
    decoders: dict[str, Any] = {}
    strips: dict[str, dict[str, Any]] = {}
    for source, stats in sorted(total.sources.items()):
        entry = strips.setdefault(source, {"notes": set(), "sentences": []})
        for _, sample in stats.samples:
            run = run_dirs[sample["run"]]
            info = run["tokenizer"]
            key = info.get("weights_sha256") or sample["run"]  # runs with the same tokenizer share one decoder
            try:
                if key not in decoders:
                    decoders[key] = plugin("run_tokenizer")(Path(run["dir"]))
                decoder = decoders[key]
                pixels = decoder.decode_tokens(np.asarray(sample["tokens"]).reshape(-1, TOKENS_PER_IMAGE))  # (N, H, W, 3)
            except (ValueError, OSError, RuntimeError) as err:
                entry["notes"].add(f"not decoded: {err}")
                continue
            if not info.get("trained", False):
                entry["notes"].add(f"decoded with an UNTRAINED tokenizer ({info.get('id')}, random weights): "
                                   "the pipeline is real, the pictures are noise")
            if decoder.info["weights_sha256"] != info.get("weights_sha256"):
                entry["notes"].add("the decoder's weights differ from the ones the run recorded")
            entry["sentences"].append({"task": sample["task"], "shard": sample["shard"], "images": sample["images"],
                                       "pngs": [_png_uri(p) for p in pixels]})
    return {s: {"notes": sorted(e["notes"]), "sentences": e["sentences"]} for s, e in strips.items()}


def _png_uri(pixels: np.ndarray) -> str:
    from PIL import Image

    image = Image.fromarray(pixels).resize((THUMB, THUMB), Image.BILINEAR)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------- the page


def render_report(data: dict[str, Any], strips: dict[str, dict[str, Any]] | None = None) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>UVD audit: {escape(data['root'])}</title>"
             f"<style>{CSS}</style></head><body>", f"<h1>UVD data-mix audit</h1><p class='muted'>{escape(data['root'])}</p>"]
    parts += [_overview(data), _shares(data), _sources(data), _structure(data), _rejects(data), _sizes(data),
              _codebook(data), _strips(strips or {})]
    parts.append("<details><summary>All numbers (JSON)</summary><pre>"
                 f"{escape(json.dumps(data, indent=1))}</pre></details></body></html>")
    return "\n".join(parts)


def _overview(data: dict[str, Any]) -> str:
    t = data["totals"]
    out = ["<h2>Overview</h2>"]
    untrained = sorted({r["tokenizer"]["id"] for r in data["runs"] if r["tokenizer"].get("trained") is False})
    if untrained:
        out.append(f"<div class='warn'>Tokens come from an <b>untrained</b> tokenizer ({escape(', '.join(untrained))}): "
                   "counts are real, token ids and code usage carry no image meaning.</div>")
    target = data.get("target")
    if target:
        if target["ok"]:
            out.append(f"<div class='ok'>Mix within tolerance of target <b>{escape(target['name'])}</b>.</div>")
        else:
            out.append(f"<div class='bad'>Drift beyond tolerance from target <b>{escape(target['name'])}</b>: "
                       f"{escape(', '.join(target['drifted']))}</div>")
    out.append(_table(["sentences", "images", "tokens", "rejected inputs", "shards"],
                      [[t["sentences"], t["images"], t["tokens"], t["rejected"], t["shards"]]], left=0))
    rows = [[r["path"], r["source"], r["status"], r["shards"], r["tokenizer"]["id"], r["tokenizer"]["trained"]] for r in data["runs"]]
    out.append(_table(["run", "source", "status", "shards", "tokenizer", "trained"], rows, left=3))
    return "".join(out)


def _shares(data: dict[str, Any]) -> str:
    out = ["<h2>Token share</h2>"]
    target = data.get("target")
    if target:
        out.append(f"<p>Target <b>{escape(target['name'])}</b> (<code>{escape(target['path'])}</code>), "
                   f"tolerance ±{target['tolerance']:.1%} of all tokens unless an entry sets its own.</p>")
        for kind, rows in target["sections"].items():
            out.append(f"<h3>By {kind}, against the target</h3>")
            out.append(share_bars([{"label": r["name"], "actual": r["actual_share"], "target": r["target_share"],
                                    "flagged": r["flagged"]} for r in rows]))
            out.append(_table(["entry", "target", "actual", "drift", "tolerance", "flagged", "source/task"],
                              [[r["name"], _pct(r["target_share"]), _pct(r["actual_share"]), f"{r['drift']:+.2%}",
                                _pct(r["tolerance"]), "DRIFT" if r["flagged"] else "ok", ", ".join(r["members"]) or "–"]
                               for r in rows], flags=[r["flagged"] for r in rows]))
    out.append("<h3>By source</h3>")
    out.append(share_bars([{"label": s, "actual": e["token_share"]} for s, e in data["by_source"].items()]))
    out.append("<h3>By task</h3>")
    out.append(share_bars([{"label": t, "actual": e["token_share"]} for t, e in data["by_task"].items()]))
    out.append(_table(["task", "sources", "sentences", "images", "tokens", "token share"],
                      [[t, ", ".join(e["sources"]), e["sentences"], e["images"], e["tokens"], _pct(e["token_share"])]
                       for t, e in data["by_task"].items()], left=2))
    return "".join(out)


def _sources(data: dict[str, Any]) -> str:
    rows = []
    for s, e in data["by_source"].items():
        rows.append([s, "(all)", e["sentences"], e["images"], e["tokens"], _pct(e["token_share"]), e["images_per_sentence"]])
        for t, te in e["tasks"].items():
            rows.append(["", t, te["sentences"], te["images"], te["tokens"], _pct(te["token_share"]),
                         te["images"] / te["sentences"] if te["sentences"] else 0.0])
    return "<h2>Per source</h2>" + _table(["source", "task", "sentences", "images", "tokens", "token share", "images / sentence"], rows, left=2)


def _structure(data: dict[str, Any]) -> str:
    out = ["<h2>Sentence structure</h2><p class='muted'>Images per sentence (frames for video, views for 3D, pairs for "
           "annotated data) per task, and the structure keys found in <code>meta</code> (strides, views, annotation types, k).</p>"]
    tasks = [t for e in data["by_source"].values() for t in e["tasks"]]
    kinds = {"video (frames, strides)": ("video",), "3D (views)": ("multiview", "view"), "annotated": ("annot", "segment", "depth", "pose", "detect")}
    missing = [k for k, words in kinds.items() if not any(w in t for t in tasks for w in words)
               and not any(w in key for e in data["by_source"].values() for key in e["structure"]["meta_values"] for w in words)]
    if missing:
        out.append(f"<p class='muted'>No {', '.join(missing)} sentences in these runs yet; their sections fill in when such sources land.</p>")
    for s, e in data["by_source"].items():
        out.append(f"<h3>{escape(s)}</h3><div class='row'>")
        for t, te in e["tasks"].items():
            hist = te["num_images_hist"]
            out.append(histogram(list(hist), list(hist.values()), f"{t}: images / sentence", width=max(60 + 28 * len(hist), 40 + 6 * (len(t) + 20)),
                                 height=140, rotate=False))
        out.append("</div>")
        values = e["structure"]["meta_values"]
        if values:
            out.append(_table(["meta key", "value", "sentences"], [[k, v, n] for k, vs in values.items() for v, n in vs.items()], left=2))
        keys = e["structure"]["meta_keys"]
        out.append(f"<p class='muted'>meta keys (sentences having each): {escape(', '.join(f'{k} {n:,}' for k, n in keys.items()))}</p>")
    return "".join(out)


def _rejects(data: dict[str, Any]) -> str:
    rows = []
    for s, e in data["by_source"].items():
        for reason, r in e["rejected_by_reason"].items():
            examples = "; ".join(x["key"] + (f" ({x['detail']})" if x["detail"] else "") for x in r["examples"])
            rows.append([s, reason, r.get("meaning", ""), r["count"], examples])
    if not rows:
        return "<h2>Rejected inputs</h2><p>None.</p>"
    return "<h2>Rejected inputs</h2>" + _table(["source", "reason", "meaning", "count", "examples"], rows, left=3)


def _sizes(data: dict[str, Any]) -> str:
    out = ["<h2>Input image sizes (before preprocessing)</h2><p class='muted'>Sizes of the images that made it into "
           "sentences, as read from the inputs (<code>meta.image_sizes</code>).</p>"]
    side_labels, aspect_labels = _bin_labels(SIDE_EDGES, "{:g}"), _bin_labels(ASPECT_EDGES, "{:.2f}")
    for s, e in data["by_source"].items():
        sizes = e["input_sizes"]
        out.append(f"<h3>{escape(s)} <span class='muted'>({sizes['images']:,} images)</span></h3><div class='row'>")
        out.append(histogram(side_labels, sizes["short_side_hist"]["counts"], "shorter side (px)", width=420))
        out.append(histogram(aspect_labels, sizes["aspect_hist"]["counts"], "aspect ratio (width / height)", width=420))
        out.append("</div>")
    return "".join(out)


def _codebook(data: dict[str, Any]) -> str:
    out = ["<h2>Codebook usage</h2>"]
    entries = [("all sources", data["codebook"])] + [(s, e["codebook"]) for s, e in data["by_source"].items()]
    entries = [(name, c) for name, c in entries if c]
    if not entries:
        return out[0] + "<p>No tokens yet.</p>"
    out.append(_table(["source", "tokens", "used codes", "dead codes", "dead share", "perplexity", "perplexity / codebook"],
                      [[n, c["tokens"], c["used_codes"], c["dead_codes"], _pct(c["dead_share"]), round(c["perplexity"], 1),
                        _pct(c["normalized_perplexity"])] for n, c in entries]))
    labels = _bin_labels(USE_EDGES, "{:g}")
    for name, c in entries:
        out.append(f"<h3>{escape(name)}</h3><div class='row'>")
        out.append(histogram(labels, c["use_hist"]["counts"], "codes by times used", width=420, log=True))
        out.append(rank_curve(c["sorted_counts"], "rank-frequency of codes", width=420))
        out.append("</div>")
    return "".join(out)


def _strips(strips: dict[str, dict[str, Any]]) -> str:
    out = ["<h2>Sample sentences, decoded</h2><p class='muted'>A uniform sample of each source (the sentences whose ids hash lowest), decoded by the "
           "tokenizer's decoder: what the model will see.</p>"]
    if not strips:
        return out[0] + "<p>No samples (--samples 0).</p>"
    for source, entry in strips.items():
        out.append(f"<h3>{escape(source)}</h3>")
        out += [f"<div class='warn'>{escape(n)}</div>" for n in entry["notes"]]
        for sentence in entry["sentences"]:
            out.append(f"<p class='muted'>{escape(sentence['task'])} · {len(sentence['pngs'])} image(s) · {escape(sentence['shard'])}</p>"
                       "<div class='strip'>")
            out += [f"<img src='{uri}' title='{escape(key)}' alt='{escape(key)}'>" for uri, key in zip(sentence["pngs"], sentence["images"])]
            out.append("</div>")
    return "".join(out)


def write_report(path: str | Path, data: dict[str, Any], strips: dict[str, dict[str, Any]] | None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_report(data, strips), encoding="utf-8")
    return path
