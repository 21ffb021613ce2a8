"""The benchmark's figures and how they read: statistics, the report, the table and the JSON.

Pure data and formatting: nothing here starts a process or talks to a server.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import PurePath
from typing import Any

from imagen.devtools.bench.config import BenchConfig


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), interpolating linearly between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class Summary:
    """Latency samples in milliseconds."""

    n: int
    p50: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(
            len(values),
            percentile(values, 50),
            percentile(values, 99),
            max(values),
            sum(values) / len(values),
        )


@dataclass(frozen=True)
class Throughput:
    """Items finished from a backlog, over the time from the backlog's commit to the last finish."""

    items: int
    seconds: float
    failed: int = 0
    capped: bool = False

    @property
    def per_second(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else 0.0


def rate(rounds: Sequence[Throughput]) -> float | None:
    """The median rate of a figure's rounds, None when it has none."""
    return percentile([r.per_second for r in rounds], 50) if rounds else None


@dataclass
class Memory:
    """Resident set size in MB: idle before a backlog, and the peak while it drains."""

    rest: float | None = None
    load: float | None = None


@dataclass
class Report:
    config: BenchConfig
    machine: dict[str, Any] = field(default_factory=dict)
    latency: dict[str, Summary] = field(default_factory=dict)
    # Every round of each backlog figure, in the order run; the table shows their median.
    throughput: dict[str, list[Throughput]] = field(default_factory=dict)
    memory: dict[str, Memory] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


LATENCY_LABELS = {
    "raw_notify": "raw INSERT -> NOTIFY received",
    "raw_claim": "raw INSERT committed -> SKIP LOCKED claim seen",
    "raw_claim_clock": "raw INSERT committed -> claimed_at (server clock)",
    "dramatiq_hop": "bare Dramatiq hop, imagen broker",
    "dramatiq_chain": "bare 3-stage chain, imagen broker",
    "dramatiq_chain_stock": "bare 3-stage chain, stock broker defaults, idle",
    "dramatiq_chain_stock_t20": "bare 3-stage chain, stock, worker_timeout=20",
    "pickup": "pickup: INSERT committed -> claim seen",
    "pickup_clock": "pickup: INSERT committed -> claimed_at (server clock)",
    "done": "INSERT -> done (finished_at), mock 64x64",
    "done_poll": "INSERT -> done seen by polling",
}
LATENCY_BASELINE = {
    "pickup": "raw_claim",
    "pickup_clock": "raw_claim_clock",
    "done": "dramatiq_chain",
    "done_poll": "dramatiq_chain",
}


@dataclass(frozen=True)
class Row:
    """One line of the table; `ratio` is the figure's p50 (or value) over the baseline's."""

    figure: str
    unit: str
    p50: float | None
    p99: float | None = None
    max: float | None = None
    baseline: str | None = None
    baseline_value: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.p50 is None or self.baseline_value is None or self.baseline_value <= 0:
            return None
        return self.p50 / self.baseline_value


def build_rows(report: Report) -> list[Row]:
    """The table: baselines first, then the pipeline's figures each next to its baseline."""
    thr, mem = report.throughput, report.memory
    rows: list[Row] = []
    for key in ("raw_notify", "raw_claim", "raw_claim_clock", "dramatiq_hop", "dramatiq_chain"):
        rows.extend(_latency_row(report, key))
    rows.extend(_latency_row(report, "dramatiq_chain_stock", "dramatiq_chain"))
    rows.extend(_latency_row(report, "dramatiq_chain_stock_t20", "dramatiq_chain"))
    for n in report.config.workers:
        chain = rate(thr.get(f"chain_{n}w", []))
        if chain is not None:
            rows.append(Row(f"bare 3-stage chain from a backlog, -p {n}", "chains/s", chain))
    for key in ("pickup", "pickup_clock", "done", "done_poll"):
        rows.extend(_latency_row(report, key, LATENCY_BASELINE[key]))
    for n in report.config.workers:
        jobs, chain = rate(thr.get(f"pipeline_{n}w", [])), rate(thr.get(f"chain_{n}w", []))
        if jobs is not None:
            rows.append(
                Row(
                    f"throughput from a backlog, -p {n}", "jobs/s", jobs,
                    baseline=f"bare chain -p {n}", baseline_value=chain,
                )
            )  # fmt: skip
    claimer, listener = mem.get("raw_claimer", Memory()), mem.get("listener", Memory())
    top = max(report.config.workers)
    ours, bare = _worker_memory(mem, f"worker_{top}w"), _worker_memory(mem, f"dramatiq_{top}w")
    for figure, value, baseline, baseline_value in (
        ("listener RSS at rest", listener.rest, "raw claimer", claimer.rest),
        ("listener RSS under load", listener.load, "raw claimer", claimer.rest),
        (f"worker process RSS at rest, -p {top}", ours.rest, f"bare worker -p {top}", bare.rest),
        (f"worker process RSS under load, -p {top}", ours.load, f"bare worker -p {top}", bare.load),
    ):
        rows.append(Row(figure, "MB", value, baseline=baseline, baseline_value=baseline_value))
    return rows


def _latency_row(report: Report, key: str, base: str | None = None) -> list[Row]:
    summary = report.latency.get(key)
    if summary is None:
        return []
    reference = report.latency.get(base) if base else None
    return [
        Row(
            LATENCY_LABELS[key], "ms", summary.p50, summary.p99, summary.max,
            baseline=LATENCY_LABELS[base] if base and reference else None,
            baseline_value=reference.p50 if reference else None,
        )
    ]  # fmt: skip


def _worker_memory(memory: dict[str, Memory], prefix: str) -> Memory:
    """The largest worker process (not the dramatiq master) of one worker set."""
    found = [
        m for name, m in memory.items() if name.startswith(prefix + "_") and not name.endswith("_master")
    ]
    rests = [m.rest for m in found if m.rest is not None]
    loads = [m.load for m in found if m.load is not None]
    return Memory(max(rests) if rests else None, max(loads) if loads else None)


@dataclass(frozen=True)
class Target:
    """One of the benchmark's targets (docs/benchmarks.md); `met` is None when the run did not measure it."""

    name: str
    limit: float
    unit: str
    at_most: bool
    value: float | None

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.at_most else self.value >= self.limit


def evaluate_targets(report: Report) -> list[Target]:
    """The benchmark's targets (docs/benchmarks.md) against this run."""
    lat, thr = report.latency, report.throughput
    pickup, done = lat.get("pickup"), lat.get("done")
    jobs, chain = rate(thr.get("pipeline_2w", [])), rate(thr.get("chain_2w", []))
    listener = report.memory.get("listener", Memory())
    rss = [v for v in (listener.rest, listener.load) if v is not None]
    return [
        Target("pickup p50", 2.0, "ms", True, pickup.p50 if pickup else None),
        Target("pickup p99", 10.0, "ms", True, pickup.p99 if pickup else None),
        Target("INSERT -> done p50", 20.0, "ms", True, done.p50 if done else None),
        Target("INSERT -> done p99", 60.0, "ms", True, done.p99 if done else None),
        Target("throughput, 2 workers", 400.0, "jobs/s", False, jobs),
        Target(
            "throughput / bare chain, 2 workers",
            0.7,
            "x",
            False,
            jobs / chain if jobs is not None and chain else None,
        ),
        Target("listener RSS", 80.0, "MB", True, max(rss) if rss else None),
    ]


def format_value(value: float | None) -> str:
    """Three significant digits or so: 0.412, 4.12, 41.2, 412."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def format_ratio(value: float | None, baseline: float | None) -> str:
    """`value / baseline` as `1.23x`; `-` when either side is missing or the baseline is not positive."""
    if value is None or baseline is None or baseline <= 0:
        return "-"
    return f"{value / baseline:.2f}x"


# How a figure in each unit compares: (word when ours is larger, word when smaller, larger is better).
_DIRECTIONS = {"ms": ("slower", "faster", False), "MB": ("more", "less", False)}
_RATE_DIRECTION = ("faster", "slower", True)
RATIO_LEGEND = (
    "vs baseline: how many times slower or faster (latency: the time taken; throughput: items per"
    " second), or more or less memory, the figure is than its baseline; 1.00x = the same"
)


def format_versus(value: float | None, baseline: float | None, unit: str) -> str:
    """The figure against its baseline in words that say the direction: `1.52x slower`, `1.31x faster`.

    Every row reads the same way whatever its unit: for latency a larger figure is slower,
    for a rate (jobs/s) a larger figure is faster, for memory it is more.
    """
    if value is None or baseline is None or baseline <= 0 or value <= 0:
        return "-"
    larger, smaller, _ = _DIRECTIONS.get(unit, _RATE_DIRECTION)
    if abs(value - baseline) < 0.005 * baseline:
        return "1.00x (same)"
    if value > baseline:
        return f"{value / baseline:.2f}x {larger}"
    return f"{baseline / value:.2f}x {smaller}"


def text_table(lines: Sequence[Sequence[str]], left: tuple[int, ...] = (0,)) -> list[str]:
    """Rows of cells as aligned text: the first row a header, a rule under it, columns in `left`
    left-aligned and the others right-aligned (figures)."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = [
        " | ".join(
            cell.ljust(w) if i in left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return out


def render_table(report: Report) -> str:
    """figure | p50 | p99 | max | baseline | vs baseline, its legend, then the targets."""
    header = ("figure", "p50", "p99", "max", "baseline", "vs baseline")
    lines = [header]
    for row in build_rows(report):
        base = f"{format_value(row.baseline_value)} ({row.baseline})" if row.baseline else "-"
        lines.append(
            (
                f"{row.figure} ({row.unit})", format_value(row.p50), format_value(row.p99),
                format_value(row.max), base, format_versus(row.p50, row.baseline_value, row.unit),
            )
        )  # fmt: skip
    out = text_table(lines, left=(0, 4))
    out.append(RATIO_LEGEND)
    out.append("")
    for target in evaluate_targets(report):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target.met]
        sign = "<=" if target.at_most else ">="
        out.append(
            f"target {target.name} {sign} {format_value(target.limit)} {target.unit}: {format_value(target.value)} -> {verdict}"
        )
    out.extend(round_lines(report))
    out.extend(f"note: {note}" for note in report.notes)
    return "\n".join(out)


def round_lines(report: Report) -> list[str]:
    """Each width's backlog rounds side by side: the spread behind the medians in the table."""
    lines = []
    for n in report.config.workers:
        jobs, chains = report.throughput.get(f"pipeline_{n}w", []), report.throughput.get(f"chain_{n}w", [])
        if len(jobs) < 2 and len(chains) < 2:
            continue
        ratios = [j.per_second / c.per_second for j, c in zip(jobs, chains, strict=False) if c.per_second]
        lines.append(
            f"rounds -p {n}: pipeline {_series(j.per_second for j in jobs)} jobs/s,"
            f" bare chain {_series(c.per_second for c in chains)} chains/s,"
            f" ratio round by round {' / '.join(f'{r:.2f}' for r in ratios)}"
        )
    return lines


def _series(values: Iterable[float]) -> str:
    return " / ".join(format_value(v) for v in values)


def report_json(report: Report) -> dict[str, Any]:
    """The whole report as plain JSON types."""
    return {
        "schema": 2,
        "machine": report.machine,
        "config": {k: str(v) if isinstance(v, PurePath) else v for k, v in asdict(report.config).items()},
        "elapsed_s": round(report.elapsed_s, 1),
        "latency_ms": {key: asdict(value) for key, value in report.latency.items()},
        "throughput": {
            key: {
                "per_second": rate(rounds),
                "rounds": [{**asdict(r), "per_second": r.per_second} for r in rounds],
            }
            for key, rounds in report.throughput.items()
        },
        "memory_mb": {key: asdict(value) for key, value in report.memory.items()},
        "rows": [{**asdict(row), "ratio": row.ratio} for row in build_rows(report)],
        "targets": [{**asdict(t), "met": t.met} for t in evaluate_targets(report)],
        "notes": report.notes,
    }
