"""What `imagen bench --scale` found: its steps, their ratios to the fresh table, the targets and
the tables and JSON it prints (the run itself is imagen/devtools/bench/scale.py)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from imagen.devtools.bench.config import BenchConfig
from imagen.devtools.bench.report import Summary, Throughput, format_value, text_table

TARGET_RATE, TARGET_PICKUP, TARGET_CLAIM_MS = 0.9, 1.1, 5.0


@dataclass(frozen=True)
class ClaimCost:
    """The listener's claims during one backlog, from pg_stat_statements (server time, ms)."""

    calls: int
    mean_ms: float
    max_ms: float
    rows_per_call: float
    blocks_per_call: float


@dataclass
class Step:
    name: str
    label: str
    rows: int = 0  # imagen.jobs rows when the step's backlog went in
    pickup: Summary | None = None
    done: Summary | None = None
    rate: Throughput | None = None  # the median of `rates`
    rates: list[Throughput] = field(default_factory=list)  # one backlog per round, in order
    claims: ClaimCost | None = None
    probe: Summary | None = None  # one 100-job claim over the step's pending shape, execution ms
    load: float = 0.0
    # CPU per timed job over all rounds (ms) by process group, and the whole machine's: what a job
    # costs where, so a step's lower rate can be put down to the processes that spend more.
    cpu_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class ScaleReport:
    config: BenchConfig
    machine: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


def median_round(rates: list[Throughput]) -> Throughput:
    """The round a step's rate is: the median (the upper one of an even count). One 2-3 s backlog
    on a shared machine can run 10-20% off its neighbours; the median of three does not move with it."""
    return sorted(rates, key=lambda r: r.per_second)[len(rates) // 2]


def combined_claims(costs: list[ClaimCost]) -> ClaimCost | None:
    """The listener's claims over every round of a step, as if one backlog."""
    calls = sum(c.calls for c in costs)
    if not calls:
        return None
    return ClaimCost(
        calls,
        sum(c.mean_ms * c.calls for c in costs) / calls,
        max(c.max_ms for c in costs),
        sum(c.rows_per_call * c.calls for c in costs) / calls,
        sum(c.blocks_per_call * c.calls for c in costs) / calls,
    )


def scale_ratios(report: ScaleReport) -> dict[str, dict[str, float | None]]:
    """Each step's rate and pickup over the fresh step's (rate: higher is better; pickup: lower)."""
    fresh = report.steps[0] if report.steps else None
    out: dict[str, dict[str, float | None]] = {}
    for step in report.steps:
        rate = pickup = None
        if fresh and fresh.rate and step.rate and fresh.rate.per_second:
            rate = step.rate.per_second / fresh.rate.per_second
        if fresh and fresh.pickup and step.pickup and fresh.pickup.p50:
            pickup = step.pickup.p50 / fresh.pickup.p50
        out[step.name] = {"rate": rate, "pickup": pickup}
    return out


def render_scale(report: ScaleReport) -> str:
    """One line per step: rows, load, backlog rate, idle pickup, the claim's cost; then the targets."""
    ratios = scale_ratios(report)
    header = ("step", "rows", "load", "jobs/s", "rounds", "x fresh", "pickup p50/p99 ms", "x fresh",
              "claim mean/max ms", "rows/claim", "blocks/claim", "probe p50/p99 ms")  # fmt: skip
    lines = [header]
    for s in report.steps:
        r, c = ratios[s.name], s.claims
        lines.append((
            s.label, f"{s.rows:,}", f"{s.load:.1f}", format_value(s.rate.per_second if s.rate else None),
            _spread(s.rates), _x(r["rate"]), f"{format_value(s.pickup.p50 if s.pickup else None)}/"
            f"{format_value(s.pickup.p99 if s.pickup else None)}", _x(r["pickup"]),
            f"{format_value(c.mean_ms)}/{format_value(c.max_ms)}" if c else "-",
            format_value(c.rows_per_call) if c else "-", format_value(c.blocks_per_call) if c else "-",
            f"{format_value(s.probe.p50)}/{format_value(s.probe.p99)}" if s.probe else "-",
        ))  # fmt: skip
    out = text_table(lines)
    out.append("")
    out.extend(_cpu_table(report))
    for name, verdict in scale_targets(report):
        out.append(f"target {name}: {verdict}")
    out.extend(f"note: {note}" for note in report.notes)
    return "\n".join(out)


def scale_targets(report: ScaleReport) -> list[tuple[str, str]]:
    ratios = scale_ratios(report)
    found = []
    for step in report.steps[1:]:
        r = ratios[step.name]
        found.append(
            (f"rate x fresh >= {TARGET_RATE} ({step.label})", _verdict(r["rate"], TARGET_RATE, at_most=False))
        )
        found.append(
            (
                f"pickup x fresh <= {TARGET_PICKUP} ({step.label})",
                _verdict(r["pickup"], TARGET_PICKUP, at_most=True),
            )
        )
    wide = next((s for s in report.steps if s.name == "wide"), None)
    if wide is not None:
        mean = wide.claims.mean_ms if wide.claims else None
        found.append(
            (
                f"claim mean <= {TARGET_CLAIM_MS} ms at 1,000 x 100",
                _verdict(mean, TARGET_CLAIM_MS, at_most=True),
            )
        )
        found.append((f"probe p50 <= {TARGET_CLAIM_MS} ms at 1,000 x 100 (100-job claim)",
                      _verdict(wide.probe.p50 if wide.probe else None, TARGET_CLAIM_MS, at_most=True)))  # fmt: skip
    return found


def _verdict(value: float | None, limit: float, *, at_most: bool) -> str:
    if value is None:
        return "not measured"
    met = value <= limit if at_most else value >= limit
    return f"{value:.2f} -> {'met' if met else 'MISSED'}"


CPU_GROUPS = (("workers", "workers"), ("listener", "listener"), ("postgres", "PostgreSQL"),
              ("redis", "Redis"), ("machine", "machine"))  # fmt: skip


def _cpu_table(report: ScaleReport) -> list[str]:
    """CPU per timed job by process group, each step's machine total over the fresh step's: where
    a step's extra cost goes (a lower rate on a machine with no core idle is more CPU per job)."""
    steps = [s for s in report.steps if s.cpu_ms]
    if not steps:
        return []
    fresh = steps[0].cpu_ms.get("machine") if steps[0].name == "fresh" else None
    header = ("CPU per job, ms", *(label for _, label in CPU_GROUPS), "machine x fresh")
    lines = [header]
    for s in steps:
        machine = s.cpu_ms.get("machine")
        lines.append((
            s.label, *(format_value(s.cpu_ms.get(key)) for key, _ in CPU_GROUPS),
            _x(machine / fresh if machine and fresh else None),
        ))  # fmt: skip
    return [*text_table(lines), ""]


def _spread(rates: list[Throughput]) -> str:
    """The rounds' lowest and highest rates, "-" for a single round."""
    if len(rates) < 2:
        return "-"
    values = sorted(r.per_second for r in rates)
    return f"{format_value(values[0])}-{format_value(values[-1])}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def scale_json(report: ScaleReport) -> dict[str, Any]:
    data = asdict(report)
    data["config"] = {
        k: (str(v) if v is not None and not isinstance(v, int | float | bool | tuple) else v)
        for k, v in data["config"].items()
    }
    data["ratios"] = scale_ratios(report)
    data["targets"] = dict(scale_targets(report))
    return data
