"""`imagen bench --scale`: does the pipeline stay as fast as the table and the owners grow?

One pipeline (`imagen listen` and `dramatiq imagen.actors -p 2`) on one pair of fresh servers
goes through four steps, each adding to the table what a year of use would: a fresh table,
then 1,000,000 finished rows, then a backlog from 3,000 owners with one job each, then one
from 1,000 owners with 100 jobs each. At every step it measures the idle pickup (sequential
jobs on a quiet pipeline) and the rate of a backlog's first `jobs` jobs, `rounds` backlogs a step
(the median counts), and reads the
claim's cost from pg_stat_statements (the listener's own claims during those backlogs) and from
a probe (one 100-job claim over the step's pending shape, rolled back). Figures are ratios to
the fresh step of the same run. Filler rows are bulk-inserted with generate_series; autovacuum
is off and the bench runs VACUUM ANALYZE before each step, outside the timed parts, as
autovacuum would between bursts. The method is in docs/benchmarks.md.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from imagen import jobs as job_sql
from imagen.devtools.bench.config import JOB_PARAMS, BenchConfig, BenchError, Echo
from imagen.devtools.bench.report import Summary, Throughput, format_value
from imagen.devtools.bench.run import JOB_INSERT, JOB_POLL, BenchRun, execute
from imagen.devtools.bench.sql import QUERIES

WIDTH = 2  # worker processes, as the figures
PROBES = 50  # rolled-back claims per step: enough for a p99 that is not simply the max
PROBE_LIMIT = 100  # the shipped IMAGEN_CLAIM_BATCH
FINISHED_ROWS = 1_000_000
STEPS = (
    ("fresh", "fresh table, 10 owners"),
    ("finished", f"+ {FINISHED_ROWS:,} finished rows, 10 owners"),
    ("owners", "+ 3,000 owners x 1 job"),
    ("wide", "+ 1,000 owners x 100 jobs"),
)
TARGET_RATE, TARGET_PICKUP, TARGET_CLAIM_MS = 0.9, 1.1, 5.0
# The statements are in bench.sql (section: imagen bench --scale).
FILL_FINISHED = QUERIES["scale_fill_finished"]
FILL_PENDING = QUERIES["scale_fill_pending"]
DONE_SINCE = QUERIES["scale_done_since"]
CLAIM_STATS = QUERIES["scale_claim_stats"]


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


@dataclass
class ScaleReport:
    config: BenchConfig
    machine: dict[str, Any] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0


class ScaleRun(BenchRun):
    """The steps of one --scale run on one pipeline; servers and processes as `BenchRun`'s."""

    def __init__(self, config: BenchConfig, echo: Echo, stack: Any) -> None:
        super().__init__(config, echo, stack)
        # Autovacuum off, the table vacuumed by the bench after each step's fill and backlog: the
        # autovacuum of a 100,000-row burst (a VACUUM and an ANALYZE of the whole table, about one
        # core for seconds) would otherwise land in that step's timed backlog and nowhere else.
        self.pg.settings.update({"shared_preload_libraries": "pg_stat_statements", "autovacuum": "off"})
        self.scale = ScaleReport(config)

    def start_servers(self) -> None:
        super().start_servers()
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.scale.machine = self.report.machine

    def measure(self) -> None:
        with (
            self._pipeline(WIDTH) as (_listener, workers),
            psycopg.connect(self.db_url, autocommit=True) as conn,
            psycopg.connect(self.db_url, autocommit=True) as poller,
        ):
            self._warm_jobs()
            for name, label in STEPS:
                step = Step(name, label)
                self.scale.steps.append(step)
                self._step(conn, poller, step, workers)

    def _step(
        self, conn: psycopg.Connection[Any], poller: psycopg.Connection[Any], step: Step, workers: Any
    ) -> None:
        jobs = self.config.jobs
        if step.name == "finished":
            self.echo(f"{step.label}: inserting the filler rows")
            conn.execute(FILL_FINISHED, {"n": FINISHED_ROWS, "params": Jsonb(JOB_PARAMS)})
        conn.execute(QUERIES["scale_vacuum"])
        step.rows = int(_scalar(conn, QUERIES["scale_rows"]))
        step.load = os.getloadavg()[0]
        self.echo(f"{step.label}: {self.config.samples} idle jobs one at a time (load {step.load:.1f})")
        self._idle_samples(conn, poller, step)
        owners, each = {"owners": (3000, 1), "wide": (1000, 100)}.get(step.name, (self.config.owners, 0))
        # Every step times the first `jobs` of a bigger backlog, so none includes the drain's tail
        # (the last jobs finishing on fewer threads): timed to the end, the fresh step's backlog
        # read 20% slower than the same pipeline halfway through the 100,000 jobs of the last.
        total = owners * each if each else jobs + jobs // 2
        want = min(jobs, total)
        costs = []
        for i in range(self.config.rounds):
            if i:
                conn.execute(QUERIES["scale_vacuum"])  # as autovacuum would between two bursts
            rounds = f" (round {i + 1} of {self.config.rounds})" if self.config.rounds > 1 else ""
            self.echo(f"{step.label}: a backlog of {total} jobs, the rate of its first {want}{rounds}")
            rate, cost = self._backlog(conn, step, workers, owners, total, want)
            step.rates.append(rate)
            if cost is not None:
                costs.append(cost)
        step.rate = median_round(step.rates)
        step.claims = _combined(costs)
        # Last: its rolled-back rows are dead entries in the claim's index until the next VACUUM.
        step.probe = self._probe(conn, owners, max(1, total // owners))

    def _backlog(
        self, conn: psycopg.Connection[Any], step: Step, workers: Any, owners: int, total: int, want: int
    ) -> tuple[Throughput, ClaimCost | None]:
        """One backlog of `total` jobs from `owners` new owners: the rate of its first `want`, and
        the listener's claims meanwhile; then the rest is cancelled and the running jobs end."""
        t0 = _scalar(conn, "SELECT clock_timestamp()")
        ids = [uuid.uuid4() for _ in range(owners)]
        conn.execute(
            FILL_PENDING, {"owners": ids, "n_owners": owners, "n": total, "params": Jsonb(JOB_PARAMS)}
        )
        # The claim's statistics start when the backlog is there, as its rate does: a claim that
        # ran while the fill's one transaction was still open walked its uncommitted index entries
        # (up to 100,000 at the last step), which no real backlog, arriving a row at a time, has.
        conn.execute("SELECT pg_stat_statements_reset()")
        started = time.time()
        capped = self._drain(
            lambda: _scalar(conn, DONE_SINCE, {"t0": t0}) >= want, workers, started, step.label
        )
        done = int(_scalar(conn, DONE_SINCE, {"t0": t0}))
        rate = Throughput(done, time.time() - started, capped=capped)
        cost = _claim_cost(conn)
        conn.execute(QUERIES["scale_cancel_pending"], {"owners": ids})
        self._drain(lambda: _scalar(conn, QUERIES["scale_running"]) == 0, workers, time.time(), step.label)
        return rate, cost

    def _idle_samples(
        self, conn: psycopg.Connection[Any], poller: psycopg.Connection[Any], step: Step
    ) -> None:
        owner, pickups, dones = uuid.uuid4(), [], []
        for _ in range(self.config.samples):
            probe = self._row_sample(
                conn, poller, JOB_INSERT, (owner, Jsonb(JOB_PARAMS)), JOB_POLL, until_done=True
            )
            pickups.append(probe.claim_seen * 1000)
            dones.append((probe.done_clock or 0.0) * 1000)
            self._gap()
        step.pickup, step.done = Summary.of(pickups), Summary.of(dones)

    def _probe(self, conn: psycopg.Connection[Any], owners: int, each: int) -> Summary:
        """One 100-job claim over this step's pending shape, in a transaction rolled back each time
        (the listener never sees the rows): the claim's execution time as the server reports it."""
        times = []
        ids = [uuid.uuid4() for _ in range(owners)]
        with conn.transaction(force_rollback=True):
            conn.execute(
                FILL_PENDING,
                {"owners": ids, "n_owners": owners, "n": owners * each, "params": Jsonb(JOB_PARAMS)},
            )
            for _ in range(PROBES):
                with conn.transaction(force_rollback=True):
                    plan = conn.execute(
                        "EXPLAIN (ANALYZE, TIMING OFF) " + job_sql.CLAIM,
                        {"limit": PROBE_LIMIT, "max_owners": 1000},
                    ).fetchall()
                times.append(next(float(r[0].split()[2]) for r in plan if r[0].startswith("Execution Time")))
        return Summary.of(times)


def _scalar(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> Any:
    row = conn.execute(sql, params).fetchone()
    if row is None:
        raise BenchError(f"no row from {sql!r}")
    return row[0]


def _claim_cost(conn: psycopg.Connection[Any]) -> ClaimCost | None:
    row = conn.execute(CLAIM_STATS).fetchone()
    if row is None or not row[0]:
        return None
    calls = int(row[0])  # the claim with the count inside (below the cap) and the plain one, together
    return ClaimCost(calls, float(row[1]), float(row[2]), float(row[3]) / calls, float(row[4]) / calls)


def median_round(rates: list[Throughput]) -> Throughput:
    """The round a step's rate is: the median (the upper one of an even count). One 2-3 s backlog
    on a shared machine can run 10-20% off its neighbours; the median of three does not move with it."""
    return sorted(rates, key=lambda r: r.per_second)[len(rates) // 2]


def _combined(costs: list[ClaimCost]) -> ClaimCost | None:
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


def run_scale(config: BenchConfig, echo: Echo | None = None) -> ScaleReport:
    """Every step on one pair of fresh servers; stop all processes and servers however it ends."""
    run = execute(ScaleRun, config, echo)
    assert isinstance(run, ScaleRun)
    report = run.scale
    report.elapsed_s = run.report.elapsed_s
    report.machine = run.report.machine
    report.notes.extend(run.report.notes)
    return report


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
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        " | ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    out.insert(1, "-+-".join("-" * w for w in widths))
    out.append("")
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
