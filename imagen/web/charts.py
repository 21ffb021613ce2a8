"""Server-rendered SVG charts for the health view: no chart library, no script.

Plain arithmetic from per-minute buckets to SVG markup, so the charts render
in any browser, in a test, and with JavaScript off. Only numbers and fixed
labels reach the markup; nothing a user typed does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from markupsafe import Markup

WIDTH = 640
HEIGHT = 160
PAD_LEFT = 44
PAD_BOTTOM = 20
PAD_TOP = 8


@dataclass(frozen=True)
class Series:
    """One line of a line chart: a value (or a gap) per slot."""

    name: str
    color: str
    values: Sequence[float | None]


def _nice_max(value: float) -> float:
    """A round upper bound for an axis (1, 2, 5 x 10^n) at or above `value`."""
    if value <= 0:
        return 1.0
    step = 1.0
    while step * 10 <= value:
        step *= 10
    while step > value * 10:
        step /= 10
    for factor in (1, 2, 5, 10):
        if step * factor >= value:
            return step * factor
    return step * 10


def _fmt(value: float, unit: str) -> str:
    if unit == "s":
        if value < 1:
            return f"{value * 1000:.0f} ms"
        return f"{value:.3g} s"
    return f"{value:g}"


def _frame(title: str, top: float, unit: str, slots: int, start: datetime | None) -> list[str]:
    plot_w = WIDTH - PAD_LEFT
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{title}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{title}</title>",
    ]
    for frac in (0.0, 0.5, 1.0):
        y = PAD_TOP + plot_h * (1 - frac)
        parts.append(f'<line class="grid" x1="{PAD_LEFT}" y1="{y:.1f}" x2="{WIDTH}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="axis" x="{PAD_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">'
            f"{_fmt(top * frac, unit)}</text>"
        )
    if start is not None and slots:
        # The first and last labels align with the plot's edges so neither is cut off.
        for i, where, anchor in ((0, 0.0, "start"), (slots // 2, 0.5, "middle"), (slots - 1, 1.0, "end")):
            x = PAD_LEFT + plot_w * (i + where) / slots
            label = (start + timedelta(minutes=i)).strftime("%H:%M")
            parts.append(
                f'<text class="axis" x="{x:.1f}" y="{HEIGHT - 4}" text-anchor="{anchor}">{label}</text>'
            )
    return parts


def bar_chart(title: str, stacks: Sequence[tuple[str, str, Sequence[int]]], start: datetime | None) -> Markup:
    """Stacked bars per slot: `stacks` is (name, color, counts per slot), bottom first."""
    slots = max((len(values) for _, _, values in stacks), default=0)
    totals = [sum(values[i] for _, _, values in stacks if i < len(values)) for i in range(slots)]
    top = _nice_max(max(totals, default=0))
    parts = _frame(title, top, "", slots, start)
    plot_w = WIDTH - PAD_LEFT
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    width = plot_w / slots if slots else 0
    for i in range(slots):
        base = 0.0
        for name, color, values in stacks:
            n = values[i] if i < len(values) else 0
            if not n:
                continue
            h = plot_h * n / top
            y = PAD_TOP + plot_h - base - h
            parts.append(
                f'<rect x="{PAD_LEFT + i * width + 0.5:.1f}" y="{y:.1f}" width="{max(width - 1, 0.5):.1f}" '
                f'height="{h:.1f}" fill="{color}"><title>{name} {n}</title></rect>'
            )
            base += h
    parts.append(_legend([(name, color) for name, color, _ in stacks]))
    parts.append("</svg>")
    return Markup("".join(parts))


def line_chart(title: str, series: Sequence[Series], start: datetime | None, unit: str = "s") -> Markup:
    """Lines per series over the slots; a None value leaves a gap (no jobs finished that minute)."""
    slots = max((len(s.values) for s in series), default=0)
    peak = max((v for s in series for v in s.values if v is not None), default=0.0)
    top = _nice_max(peak)
    parts = _frame(title, top, unit, slots, start)
    plot_w = WIDTH - PAD_LEFT
    plot_h = HEIGHT - PAD_BOTTOM - PAD_TOP
    for line in series:
        points: list[str] = []
        segments: list[list[str]] = []
        for i, value in enumerate(line.values):
            if value is None:
                if points:
                    segments.append(points)
                points = []
                continue
            x = PAD_LEFT + plot_w * (i + 0.5) / slots
            y = PAD_TOP + plot_h * (1 - min(value, top) / top)
            points.append(f"{x:.1f},{y:.1f}")
        if points:
            segments.append(points)
        for segment in segments:
            if len(segment) == 1:
                cx, cy = segment[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{line.color}"/>')
            else:
                parts.append(
                    f'<polyline fill="none" stroke="{line.color}" stroke-width="2" '
                    f'points="{" ".join(segment)}"/>'
                )
    parts.append(_legend([(s.name, s.color) for s in series]))
    parts.append("</svg>")
    return Markup("".join(parts))


def _legend(items: Sequence[tuple[str, str]]) -> str:
    out = []
    x = PAD_LEFT + 8
    for name, color in items:
        out.append(f'<rect x="{x}" y="{PAD_TOP + 2}" width="10" height="10" fill="{color}"/>')
        out.append(f'<text class="legend" x="{x + 14}" y="{PAD_TOP + 11}">{name}</text>')
        x += 14 + 7 * len(name) + 16
    return "".join(out)
