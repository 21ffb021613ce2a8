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
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from imagen import jobs as job_sql
from imagen.devtools.bench.config import JOB_PARAMS, BenchConfig, BenchError, Echo
from imagen.devtools.bench.procs import CpuWatch, descendants
from imagen.devtools.bench.report import Summary, Throughput
from imagen.devtools.bench.run import JOB_INSERT, JOB_POLL, BenchRun, execute
from imagen.devtools.bench.scale_report import (
    ClaimCost,
    ScaleReport,
    Step,
    combined_claims,
    median_round,
    render_scale,
    scale_json,
    scale_ratios,
    scale_targets,
)
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
# The statements are in bench.sql (section: imagen bench --scale).
FILL_FINISHED = QUERIES["scale_fill_finished"]
FILL_PENDING = QUERIES["scale_fill_pending"]
DONE_SINCE = QUERIES["scale_done_since"]
CLAIM_STATS = QUERIES["scale_claim_stats"]


class ScaleRun(BenchRun):
    """The steps of one --scale run on one pipeline; servers and processes as `BenchRun`'s."""

    def __init__(self, config: BenchConfig, echo: Echo, stack: Any) -> None:
        super().__init__(config, echo, stack)
        # Autovacuum off, the table vacuumed by the bench after each step's fill and backlog: the
        # autovacuum of a 100,000-row burst (a VACUUM and an ANALYZE of the whole table, about one
        # core for seconds) would otherwise land in that step's timed backlog and nowhere else.
        self.pg.settings.update({"shared_preload_libraries": "pg_stat_statements", "autovacuum": "off"})
        self.scale = ScaleReport(config)
        self._cpu_groups: dict[str, Callable[[], list[int]]] = {}

    def start_servers(self) -> None:
        super().start_servers()
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.scale.machine = self.report.machine

    def measure(self) -> None:
        with (
            self._pipeline(WIDTH) as (listener, workers),
            psycopg.connect(self.db_url, autocommit=True) as conn,
            psycopg.connect(self.db_url, autocommit=True) as poller,
        ):
            self._warm_jobs()
            self._cpu_groups = {
                "workers": lambda: descendants(workers.popen.pid),
                "listener": lambda: descendants(listener.popen.pid),
                "postgres": lambda: descendants(self._pid(self.pg.proc)),
                "redis": lambda: [self._pid(self.redis.proc)],
            }
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
        costs, used = [], dict.fromkeys([*self._cpu_groups, "machine"], 0.0)
        for i in range(self.config.rounds):
            if i:
                conn.execute(QUERIES["scale_vacuum"])  # as autovacuum would between two bursts
            rounds = f" (round {i + 1} of {self.config.rounds})" if self.config.rounds > 1 else ""
            self.echo(f"{step.label}: a backlog of {total} jobs, the rate of its first {want}{rounds}")
            rate, cost, cpu = self._backlog(conn, step, workers, owners, total, want)
            step.rates.append(rate)
            used = {name: used[name] + cpu.get(name, 0.0) for name in used}
            if cost is not None:
                costs.append(cost)
        step.rate = median_round(step.rates)
        timed = sum(r.items for r in step.rates)
        step.cpu_ms = {name: seconds * 1000 / timed for name, seconds in used.items()} if timed else {}
        step.claims = combined_claims(costs)
        # Last: its rolled-back rows are dead entries in the claim's index until the next VACUUM.
        step.probe = self._probe(conn, owners, max(1, total // owners))

    def _backlog(
        self, conn: psycopg.Connection[Any], step: Step, workers: Any, owners: int, total: int, want: int
    ) -> tuple[Throughput, ClaimCost | None, dict[str, float]]:
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
        with CpuWatch(self._cpu_groups) as cpu:
            capped = self._drain(
                lambda: _scalar(conn, DONE_SINCE, {"t0": t0}) >= want, workers, started, step.label
            )
        done = int(_scalar(conn, DONE_SINCE, {"t0": t0}))
        rate = Throughput(done, time.time() - started, capped=capped)
        cost = _claim_cost(conn)
        conn.execute(QUERIES["scale_cancel_pending"], {"owners": ids})
        self._drain(lambda: _scalar(conn, QUERIES["scale_running"]) == 0, workers, time.time(), step.label)
        return rate, cost, cpu.used

    @staticmethod
    def _pid(proc: Any) -> int:
        if proc is None:
            raise BenchError("a server of the run is not running")
        return int(proc.pid)

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


def run_scale(config: BenchConfig, echo: Echo | None = None) -> ScaleReport:
    """Every step on one pair of fresh servers; stop all processes and servers however it ends."""
    run = execute(ScaleRun, config, echo)
    assert isinstance(run, ScaleRun)
    report = run.scale
    report.elapsed_s = run.report.elapsed_s
    report.machine = run.report.machine
    report.notes.extend(run.report.notes)
    return report


__all__ = [
    "PROBES", "ClaimCost", "ScaleReport", "ScaleRun", "Step", "median_round", "render_scale", "run_scale",
    "scale_json", "scale_ratios", "scale_targets",
]  # fmt: skip
