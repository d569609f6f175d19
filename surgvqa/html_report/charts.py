"""The page's charts as inline SVG, written by hand (no matplotlib, no script): per-type accuracy bars with
intervals and baselines, one accuracy on a 0-100 % scale, and line charts of training curves."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from surgvqa.html_report.markup import esc, pct


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt_value(v: float) -> str:
    """NaN, inf, -inf as a run's log writes them; a finite value to 4 significant digits."""
    return "NaN" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else f"{v:.4g}"


def _finite_runs(points: Sequence[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """The stretches of consecutive points with a finite value (a non-finite one ends a stretch)."""
    runs: list[list[tuple[float, float]]] = [[]]
    for a, b in points:
        if math.isfinite(b):
            runs[-1].append((a, b))
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def _fmt_tick(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.3g}"


PALETTE = ("#2f6fdf", "#e0892b", "#8a55c7", "#2a9d8f", "#c8372d", "#6c757d")


def svg_type_bars(
    types: Sequence[str],
    series: Sequence[tuple[str, Mapping[str, Mapping[str, Any]]]],
    majority: Mapping[str, float],
    chance: Mapping[str, float],
    collapsed: Iterable[str] = (),
) -> str:
    """Horizontal per-type accuracy bars (one per run) with 95 % interval whiskers, the majority baseline as a
    black line and chance as a dashed grey line. ``series``: (label, per_type summary) per run."""
    collapsed = set(collapsed)
    k = len(series)
    bar_h = 11 if k > 1 else 14
    group_h = k * (bar_h + 2) + 10
    left, right, top = 230, 60, 34
    width = 860
    plot_w = width - left - right
    height = top + group_h * len(types) + 26

    def x(v: float) -> float:
        return left + plot_w * max(0.0, min(1.0, v))

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="per question type accuracy">']
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{x(tick):.1f}" y1="{top - 4}" x2="{x(tick):.1f}" y2="{height - 22}" '
                     'stroke="#8884" stroke-width="1"/>')
        parts.append(f'<text x="{x(tick):.1f}" y="{height - 8}" text-anchor="middle">{100 * tick:.0f}%</text>')
    lx = left
    for j, (label, _) in enumerate(series):
        color = PALETTE[j % len(PALETTE)]
        parts.append(f'<rect x="{lx}" y="8" width="12" height="10" fill="{color}"/>'
                     f'<text x="{lx + 16}" y="17">{esc(label)}</text>')
        lx += 26 + 7 * len(label)
    parts.append(f'<line x1="{lx + 4}" y1="6" x2="{lx + 4}" y2="20" stroke="currentColor" stroke-width="2"/>'
                 f'<text x="{lx + 10}" y="17">majority</text>')
    parts.append(f'<line x1="{lx + 80}" y1="6" x2="{lx + 80}" y2="20" stroke="#888" stroke-width="1.5" '
                 f'stroke-dasharray="3 2"/><text x="{lx + 86}" y="17">chance</text>')
    for i, qtype in enumerate(types):
        y0 = top + i * group_h
        flag = "  ⚠ collapse" if qtype in collapsed else ""
        parts.append(f'<text x="{left - 8}" y="{y0 + group_h / 2 + 3:.1f}" text-anchor="end">'
                     f'{esc(qtype)}<tspan fill="#c8372d">{esc(flag)}</tspan></text>')
        for j, (label, per_type) in enumerate(series):
            t = per_type.get(qtype)
            if not t:
                continue
            yb = y0 + 5 + j * (bar_h + 2)
            color = "#c8372d" if (k == 1 and t.get("collapse")) else PALETTE[j % len(PALETTE)]
            lo, hi = t["ci95"]
            tip = (f"{label}: {qtype} {pct(t['accuracy'])} [{100 * lo:.1f}, {100 * hi:.1f}] "
                   f"n={t['n']}")
            parts.append(f'<rect x="{left}" y="{yb}" width="{x(t["accuracy"]) - left:.1f}" height="{bar_h}" '
                         f'fill="{color}" opacity="0.85"><title>{esc(tip)}</title></rect>')
            cy = yb + bar_h / 2
            parts.append(f'<path d="M{x(lo):.1f} {cy:.1f}H{x(hi):.1f}M{x(lo):.1f} {cy - 3:.1f}V{cy + 3:.1f}'
                         f'M{x(hi):.1f} {cy - 3:.1f}V{cy + 3:.1f}" stroke="currentColor" stroke-width="1.2" '
                         'fill="none"/>')
        if qtype in majority:
            mx = x(majority[qtype])
            parts.append(f'<line x1="{mx:.1f}" y1="{y0 + 2}" x2="{mx:.1f}" y2="{y0 + group_h - 6}" '
                         f'stroke="currentColor" stroke-width="2"><title>majority baseline '
                         f'{pct(majority[qtype])}</title></line>')
        if qtype in chance:
            cx = x(chance[qtype])
            parts.append(f'<line x1="{cx:.1f}" y1="{y0 + 2}" x2="{cx:.1f}" y2="{y0 + group_h - 6}" '
                         f'stroke="#888" stroke-width="1.5" stroke-dasharray="3 2"><title>chance '
                         f'{pct(chance[qtype])}</title></line>')
        parts.append(f'<text x="{width - right + 6}" y="{y0 + group_h / 2 + 3:.1f}">'
                     f'{pct(series[0][1].get(qtype, {}).get("accuracy"), 0)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_scale(acc: float, lo: float, hi: float, majority: float, chance: float) -> str:
    """One accuracy on a 0-100 % scale: the interval, the point, and the majority and chance markers."""
    width, left, right = 420, 12, 12
    plot_w = width - left - right

    def x(v: float) -> float:
        return left + plot_w * max(0.0, min(1.0, v))

    return (
        f'<svg class="chart" viewBox="0 0 {width} 62" role="img" aria-label="accuracy with 95% interval">'
        f'<rect x="{left}" y="22" width="{plot_w}" height="8" rx="4" fill="#8882"/>'
        f'<rect x="{x(lo):.1f}" y="22" width="{max(2.0, x(hi) - x(lo)):.1f}" height="8" rx="4" fill="#2f6fdf66"/>'
        f'<circle cx="{x(acc):.1f}" cy="26" r="6" fill="#2f6fdf"><title>strict accuracy {pct(acc)}</title></circle>'
        f'<line x1="{x(majority):.1f}" y1="14" x2="{x(majority):.1f}" y2="38" stroke="currentColor" '
        f'stroke-width="2"/><text x="{x(majority):.1f}" y="10" text-anchor="middle">majority</text>'
        f'<line x1="{x(chance):.1f}" y1="18" x2="{x(chance):.1f}" y2="34" stroke="#888" stroke-width="1.5" '
        f'stroke-dasharray="3 2"/><text x="{x(chance):.1f}" y="50" text-anchor="middle" fill="#888">chance</text>'
        f'<text x="{left}" y="60" font-size="10">0%</text>'
        f'<text x="{width - right}" y="60" text-anchor="end" font-size="10">100%</text></svg>'
    )


def svg_lines(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    *,
    y_label: str,
    y_range: tuple[float, float] | None = None,
    marker_x: float | None = None,
    marker_label: str = "",
    percent: bool = False,
) -> str:
    """A line chart of (step, value) series with nice ticks; an optional vertical marker (the best checkpoint).

    A value that is not finite (NaN, inf: a diverged run) breaks its line there and is marked by a cross on the
    plot's top edge (bottom for -inf), titled with its step and value; the axis is scaled to the finite values.
    """
    width, height = 560, 250
    left, right, top, bottom = 56, 16, 28, 38
    xs = [p[0] for _, pts in series for p in pts if math.isfinite(p[0])]
    ys = [p[1] for _, pts in series for p in pts if math.isfinite(p[1])] or [0.0, 1.0]
    if not xs:
        return ""
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_hi = x_lo + 1
    if x_lo > 0:
        x_lo = 0.0  # curves of one run share the step axis from 0
    if y_range:
        y_lo, y_hi = y_range
    else:
        y_lo, y_hi = min(ys), max(ys)
        pad = (y_hi - y_lo) * 0.08 or abs(y_hi) * 0.1 or 1.0
        y_lo, y_hi = max(0.0, y_lo - pad) if y_lo >= 0 else y_lo - pad, y_hi + pad
    pw, ph = width - left - right, height - top - bottom

    def px(v: float) -> float:
        return left + pw * (v - x_lo) / (x_hi - x_lo)

    def py(v: float) -> float:
        return top + ph * (1 - (v - y_lo) / (y_hi - y_lo))

    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(y_label)}">']
    for t in _nice_ticks(y_lo, y_hi):
        parts.append(f'<line x1="{left}" y1="{py(t):.1f}" x2="{width - right}" y2="{py(t):.1f}" stroke="#8883"/>'
                     f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">'
                     f'{f"{100 * t:.0f}%" if percent else _fmt_tick(t)}</text>')
    for t in _nice_ticks(x_lo, x_hi, 6):
        parts.append(f'<line x1="{px(t):.1f}" y1="{top + ph}" x2="{px(t):.1f}" y2="{top + ph + 4}" '
                     f'stroke="#888"/><text x="{px(t):.1f}" y="{top + ph + 16}" text-anchor="middle">'
                     f'{_fmt_tick(t)}</text>')
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 4}" text-anchor="middle" fill="#888">step</text>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#888"/>'
                 f'<line x1="{left}" y1="{top + ph}" x2="{width - right}" y2="{top + ph}" stroke="#888"/>')
    if marker_x is not None and x_lo <= marker_x <= x_hi:
        parts.append(f'<line x1="{px(marker_x):.1f}" y1="{top}" x2="{px(marker_x):.1f}" y2="{top + ph}" '
                     f'stroke="#1f8a4c" stroke-dasharray="4 3"/><text x="{px(marker_x) + 4:.1f}" y="{top + 10}" '
                     f'fill="#1f8a4c">{esc(marker_label)}</text>')
    lx = left
    for j, (label, pts) in enumerate(series):
        color = PALETTE[j % len(PALETTE)]
        pts = [(a, b) for a, b in pts if math.isfinite(a)]
        finite = [(a, b) for a, b in pts if math.isfinite(b)]
        for run in _finite_runs(pts):
            if len(run) > 1:
                path = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in run)
                parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if len(finite) <= 60 or len(finite) < len(pts):  # a lone finite point between gaps must show
            parts.extend(f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="2.6" fill="{color}">'
                         f'<title>{esc(label)} step {_fmt_tick(a)}: {b:.4g}</title></circle>' for a, b in finite)
        for a, b in pts:
            if not math.isfinite(b):
                y = top + ph if b < 0 else top
                parts.append(f'<g class="nonfinite"><path d="M{px(a) - 4:.1f},{y - 4:.1f}l8,8m0,-8l-8,8" '
                             f'stroke="#c8372d" stroke-width="2"/><title>{esc(label)} step {_fmt_tick(a)}: '
                             f'{_fmt_value(b)}</title></g>')
        parts.append(f'<rect x="{lx}" y="8" width="12" height="4" fill="{color}"/>'
                     f'<text x="{lx + 16}" y="14">{esc(label)}</text>')
        lx += 30 + 7 * len(label)
    parts.append("</svg>")
    return "".join(parts)
