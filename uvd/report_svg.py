"""Inline SVG charts for the audit report: horizontal share bars (actual vs target) and
column histograms. Plain strings, no scripts, no external references.
"""
from __future__ import annotations

from html import escape

ACTUAL, TARGET, FLAG = "#3b6ea8", "#c9c9c9", "#c0392b"


def share_text(x: float) -> str:
    return f"{x:.2%}" if 0 < abs(x) < 0.01 else f"{x:.1%}"


def share_bars(rows: list[dict], width: int = 720) -> str:
    """rows: {label, actual, target (or None), flagged} -> bars of shares in [0, 1]."""
    label_w, bar_h, gap = 220, 14, 10
    has_target = any(r.get("target") is not None for r in rows)
    row_h = bar_h * (2 if has_target else 1) + gap
    plot_w = width - label_w - 70
    height = row_h * len(rows) + 30
    out = [f'<svg width="{width}" height="{height}" font-family="sans-serif" font-size="12">']
    for i, r in enumerate(rows):
        y = 20 + i * row_h
        out.append(f'<text x="{label_w - 6}" y="{y + bar_h - 2}" text-anchor="end">{escape(r["label"][:32])}</text>')
        color = FLAG if r.get("flagged") else ACTUAL
        w = max(r["actual"] * plot_w, 0.5 if r["actual"] > 0 else 0)
        out.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{color}"/>')
        out.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar_h - 2}">{share_text(r["actual"])}</text>')
        if has_target and r.get("target") is not None:
            tw = r["target"] * plot_w
            out.append(f'<rect x="{label_w}" y="{y + bar_h}" width="{tw:.1f}" height="{bar_h - 3}" fill="{TARGET}"/>')
            out.append(f'<text x="{label_w + tw + 4:.1f}" y="{y + 2 * bar_h - 4}" fill="#666">target {share_text(r["target"])}</text>')
    out.append(f'<line x1="{label_w}" y1="12" x2="{label_w}" y2="{height - 8}" stroke="#888"/>')
    legend = f'<rect x="{label_w}" y="2" width="10" height="8" fill="{ACTUAL}"/><text x="{label_w + 14}" y="10">actual token share</text>'
    if has_target:
        legend += (f'<rect x="{label_w + 140}" y="2" width="10" height="8" fill="{TARGET}"/><text x="{label_w + 154}" y="10">target</text>'
                   f'<rect x="{label_w + 210}" y="2" width="10" height="8" fill="{FLAG}"/><text x="{label_w + 224}" y="10">drift beyond tolerance</text>')
    out.append(legend)
    out.append("</svg>")
    return "".join(out)


def histogram(labels: list[str], counts: list[int], title: str = "", width: int = 360, height: int = 170, color: str = ACTUAL,
              log: bool = False, rotate: bool = True) -> str:
    """Column histogram: one column per bin, labelled under the axis."""
    import math

    top, bottom, left = 30, 38 if rotate else 18, 34
    plot_h, plot_w = height - top - bottom, width - left - 8
    values = [math.log10(c + 1) if log else c for c in counts]
    peak = max(values) or 1
    col_w = plot_w / max(len(counts), 1)
    out = [f'<svg width="{width}" height="{height}" font-family="sans-serif" font-size="10">',
           f'<text x="{left}" y="11" font-size="11" font-weight="bold">{escape(title)}</text>']
    for i, (label, count, value) in enumerate(zip(labels, counts, values)):
        h = value / peak * plot_h
        x = left + i * col_w
        out.append(f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" width="{max(col_w - 2, 1):.1f}" height="{h:.1f}" fill="{color}">'
                   f'<title>{escape(label)}: {count:,}</title></rect>')
        if count:
            out.append(f'<text x="{x + col_w / 2:.1f}" y="{top + plot_h - h - 2:.1f}" text-anchor="middle" font-size="8">{count:,}</text>')
        if rotate:
            out.append(f'<text transform="translate({x + col_w / 2 + 3:.1f},{top + plot_h + 4}) rotate(55)" font-size="8">{escape(label)}</text>')
        else:
            out.append(f'<text x="{x + col_w / 2:.1f}" y="{top + plot_h + 12}" text-anchor="middle">{escape(label)}</text>')
    out.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}" stroke="#888"/>')
    if log:
        out.append(f'<text x="2" y="{top + 8}" font-size="8" fill="#666">log</text>')
    out.append("</svg>")
    return "".join(out)


def rank_curve(counts: list[int], title: str = "", width: int = 360, height: int = 150) -> str:
    """Code counts sorted high to low (log scale): a flat line is even use, a cliff is collapse."""
    import math

    top, bottom, left = 18, 20, 34
    plot_h, plot_w = height - top - bottom, width - left - 8
    peak = math.log10(max(counts) + 1) if counts else 1
    points = " ".join(
        f"{left + i / max(len(counts) - 1, 1) * plot_w:.1f},{top + plot_h - math.log10(c + 1) / (peak or 1) * plot_h:.1f}"
        for i, c in enumerate(counts))
    return (f'<svg width="{width}" height="{height}" font-family="sans-serif" font-size="10">'
            f'<text x="{left}" y="11" font-size="11" font-weight="bold">{escape(title)}</text>'
            f'<polyline points="{points}" fill="none" stroke="{ACTUAL}" stroke-width="1.5"/>'
            f'<line x1="{left}" y1="{top + plot_h}" x2="{width - 8}" y2="{top + plot_h}" stroke="#888"/>'
            f'<text x="{left}" y="{height - 4}" fill="#666">code rank (most used first) →</text>'
            f'<text x="2" y="{top + 8}" font-size="8" fill="#666">log</text></svg>')
