"""The pipeline's benchmark: latency, throughput and memory next to baselines from the same run.

`run_bench` starts its own throwaway PostgreSQL and Redis, the raw PostgreSQL
and bare Dramatiq baselines and the real pipeline (`imagen listen` and
`dramatiq imagen.actors -p N` through imagen.runner, with the settings we
ship). Latency samples of the pipeline and its baselines are interleaved and
each throughput run sits next to its baseline's, so a noisy neighbour weighs on
both sides of a ratio. It returns a `Report` that renders as a table and JSON.
Every process it starts is stopped when it returns, fails or is interrupted. It
must never touch a configured database or Redis. The method is in
docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.message import Message
from psycopg.types.json import Jsonb

from imagen.broker import MAX_WAKE_TOKENS, WakingRedisBroker
from imagen.errors import ImagenError
from imagen.runner import DRAMATIQ_READY, PipelineProcesses, Proc, listeners_listening, pipeline_env
from imagen.servers import PostgresServer, RedisServer

Echo = Callable[[str], None]
DRAMATIQ_THREADS = 8  # what `dramatiq` runs without -t
JOB_PARAMS = {"backend": "mock", "size": "64x64"}
POLL_CLAIM = 0.0002  # seconds between polls while waiting for a claim
POLL_DONE = 0.001
DONE_KEY = "bench:done"


class BenchError(ImagenError):
    """A phase could not run: a process died, a job failed, a deadline passed."""


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of one run.

    Sequential samples are spaced by a random `gap_ms`; the stock-broker reference waits
    `idle_gap_ms` instead, long enough for Dramatiq's idle backoff to reach its cap, as on
    a quiet pipeline. A backlog that does not drain within `throughput_timeout` seconds is
    measured on what finished.
    """

    jobs: int = 10_000
    samples: int = 200
    workers: tuple[int, ...] = (1, 2)
    stock_samples: int = 15
    threads: int = DRAMATIQ_THREADS
    owners: int = 10
    warmup: int = 32
    gap_ms: tuple[float, float] = (20.0, 60.0)
    idle_gap_ms: tuple[float, float] = (500.0, 1500.0)
    throughput_timeout: float = 45.0
    quick: bool = False


def bench_config(
    *, quick: bool = False, jobs: int | None = None, samples: int | None = None, workers: Sequence[int] = ()
) -> BenchConfig:
    """The default run, or the ~1 minute `--quick` one, with explicit sizes winning."""
    base = BenchConfig()
    if quick:
        base = BenchConfig(
            jobs=1000, samples=50, stock_samples=5, warmup=16, throughput_timeout=20, quick=True
        )
    return replace(
        base,
        jobs=jobs or base.jobs,
        samples=samples or base.samples,
        stock_samples=min(base.stock_samples, samples or base.stock_samples),
        workers=tuple(sorted(set(workers))) or base.workers,
    )


# --- statistics and the report -------------------------------------------------------------------


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
    throughput: dict[str, Throughput] = field(default_factory=dict)
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
        chain = thr.get(f"chain_{n}w")
        if chain:
            rows.append(Row(f"bare 3-stage chain from a backlog, -p {n}", "chains/s", chain.per_second))
    for key in ("pickup", "pickup_clock", "done", "done_poll"):
        rows.extend(_latency_row(report, key, LATENCY_BASELINE[key]))
    for n in report.config.workers:
        jobs, chain = thr.get(f"pipeline_{n}w"), thr.get(f"chain_{n}w")
        if jobs:
            rows.append(
                Row(
                    f"throughput from a backlog, -p {n}", "jobs/s", jobs.per_second,
                    baseline=f"bare chain -p {n}", baseline_value=chain.per_second if chain else None,
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
    """One of the issue's targets; `met` is None when the run did not measure it."""

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
    """Issue 6's targets against this run."""
    lat, thr = report.latency, report.throughput
    pickup, done = lat.get("pickup"), lat.get("done")
    jobs, chain = thr.get("pipeline_2w"), thr.get("chain_2w")
    listener = report.memory.get("listener", Memory())
    rss = [v for v in (listener.rest, listener.load) if v is not None]
    return [
        Target("pickup p50", 2.0, "ms", True, pickup.p50 if pickup else None),
        Target("pickup p99", 10.0, "ms", True, pickup.p99 if pickup else None),
        Target("INSERT -> done p50", 20.0, "ms", True, done.p50 if done else None),
        Target("INSERT -> done p99", 60.0, "ms", True, done.p99 if done else None),
        Target("throughput, 2 workers", 400.0, "jobs/s", False, jobs.per_second if jobs else None),
        Target(
            "throughput / bare chain, 2 workers",
            0.7,
            "x",
            False,
            jobs.per_second / chain.per_second if jobs and chain and chain.per_second else None,
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


def render_table(report: Report) -> str:
    """figure | p50 | p99 | max | baseline | ratio, then the targets."""
    header = ("figure", "p50", "p99", "max", "baseline", "ratio")
    lines = [header]
    for row in build_rows(report):
        base = f"{format_value(row.baseline_value)} ({row.baseline})" if row.baseline else "-"
        lines.append(
            (
                f"{row.figure} ({row.unit})", format_value(row.p50), format_value(row.p99),
                format_value(row.max), base, format_ratio(row.p50, row.baseline_value),
            )
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        " | ".join(
            cell.ljust(w) if i in (0, 4) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    out.insert(1, "-+-".join("-" * w for w in widths))
    out.append("")
    for target in evaluate_targets(report):
        verdict = {True: "met", False: "MISSED", None: "not measured"}[target.met]
        sign = "<=" if target.at_most else ">="
        out.append(
            f"target {target.name} {sign} {format_value(target.limit)} {target.unit}: {format_value(target.value)} -> {verdict}"
        )
    out.extend(f"note: {note}" for note in report.notes)
    return "\n".join(out)


def report_json(report: Report) -> dict[str, Any]:
    """The whole report as plain JSON types."""
    return {
        "schema": 1,
        "machine": report.machine,
        "config": asdict(report.config),
        "elapsed_s": round(report.elapsed_s, 1),
        "latency_ms": {key: asdict(value) for key, value in report.latency.items()},
        "throughput": {
            key: {**asdict(value), "per_second": value.per_second} for key, value in report.throughput.items()
        },
        "memory_mb": {key: asdict(value) for key, value in report.memory.items()},
        "rows": [{**asdict(row), "ratio": row.ratio} for row in build_rows(report)],
        "targets": [{**asdict(t), "met": t.met} for t in evaluate_targets(report)],
        "notes": report.notes,
    }


# --- processes and memory --------------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MB, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def child_pids(pid: int) -> list[int]:
    """Direct children of a process, from /proc/*/stat (the field after the command's closing paren)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def process_tree(label: str, pid: int) -> dict[str, int]:
    """A dramatiq master and its worker processes as `{label}_master`, `{label}_1`, ..."""
    return {f"{label}_master": pid, **{f"{label}_{i}": child for i, child in enumerate(child_pids(pid), 1)}}


class MemoryWatch:
    """Samples the RSS of named processes in a thread and keeps each one's peak."""

    def __init__(self, pids: dict[str, int], interval: float = 0.25) -> None:
        self.pids = pids
        self.interval = interval
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def _run(self) -> None:
        while True:
            for name, pid in self.pids.items():
                value = rss_mb(pid)
                if value is not None:
                    self.peaks[name] = max(value, self.peaks.get(name, 0.0))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _ready(proc: Proc, text: str, count: int = 1) -> bool:
    if not proc.alive():
        raise BenchError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail(2000)}")
    return proc.tail(10**7).count(text) >= count


def _clean_env(base: dict[str, str] | None = None, /, **extra: str) -> dict[str, str]:
    """The environment as shipped: no inherited IMAGEN_* or dramatiq_* tuning leaks into a phase."""
    env = dict(os.environ if base is None else base)
    env = {k: v for k, v in env.items() if not k.startswith("dramatiq_")}
    if base is None:
        env = {k: v for k, v in env.items() if not k.startswith("IMAGEN_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@contextlib.contextmanager
def _processes(env: dict[str, str], workdir: Path) -> Iterator[PipelineProcesses]:
    procs = PipelineProcesses(env, workdir)
    try:
        yield procs
    finally:
        procs.stop(timeout=20)


def _spawn(procs: PipelineProcesses, name: str, argv: list[str]) -> Proc:
    procs.workdir.mkdir(parents=True, exist_ok=True)
    log = procs.workdir / f"{name}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            argv,
            env=procs.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=procs.workdir,
            start_new_session=True,
        )
    proc = Proc(name=name, popen=popen, log=log)
    procs.procs.append(proc)
    return proc


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop every process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the baselines' code, written to a temp dir and run in subprocesses ----------------------------

RAW_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE bench.raw_jobs (id bigserial PRIMARY KEY, status text NOT NULL DEFAULT 'pending',
                             created_at timestamptz NOT NULL DEFAULT now(), claimed_at timestamptz);
CREATE INDEX ON bench.raw_jobs (id) WHERE status = 'pending';
CREATE FUNCTION bench.raw_notify() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_notify('bench_raw', ''); RETURN NULL; END $$;
CREATE TRIGGER raw_notify AFTER INSERT ON bench.raw_jobs FOR EACH STATEMENT EXECUTE FUNCTION bench.raw_notify();
CREATE TABLE bench.probe (id bigserial PRIMARY KEY);
CREATE FUNCTION bench.probe_notify() RETURNS trigger LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_notify('bench_probe', ''); RETURN NULL; END $$;
CREATE TRIGGER probe_notify AFTER INSERT ON bench.probe FOR EACH STATEMENT EXECUTE FUNCTION bench.probe_notify();
"""

RAW_CLAIMER = '''"""The raw baseline: a bare LISTEN connection and a plain SKIP LOCKED claim (imagen bench)."""
import os, signal, sys
import psycopg

CLAIM = """UPDATE bench.raw_jobs SET status = 'running', claimed_at = now() WHERE id IN (
    SELECT id FROM bench.raw_jobs WHERE status = 'pending' ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)"""
url = os.environ["BENCH_DATABASE_URL"]
listen = psycopg.connect(url, autocommit=True)
work = psycopg.connect(url, autocommit=True)
listen.execute("LISTEN bench_raw")
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("raw claimer ready", flush=True)
while True:
    while work.execute(CLAIM).rowcount == 100:
        pass
    for _ in listen.notifies(timeout=1.0, stop_after=1):
        pass
'''

BARE_ACTORS = '''"""Bare no-op actors for the Dramatiq baselines (imagen bench): a hop and a 3-stage chain."""
import os, time
import dramatiq, redis
from dramatiq.brokers.redis import RedisBroker
from imagen.broker import WakingRedisBroker

URL = os.environ["BENCH_REDIS_URL"]
broker = WakingRedisBroker(url=URL) if os.environ["BENCH_BROKER"] == "imagen" else RedisBroker(url=URL)
dramatiq.set_broker(broker)
results = redis.Redis.from_url(URL)

def finish(token):
    results.rpush("bench:done", "%s %r" % (token, time.time()))

@dramatiq.actor(queue_name="bench-hop")
def hop(token):
    finish(token)

@dramatiq.actor(queue_name="bench-1")
def stage1(token):
    stage2.send(token)

@dramatiq.actor(queue_name="bench-2")
def stage2(token):
    stage3.send(token)

@dramatiq.actor(queue_name="bench-3")
def stage3(token):
    finish(token)
'''


# --- one run ---------------------------------------------------------------------------------------

RAW_INSERT = "INSERT INTO bench.raw_jobs DEFAULT VALUES RETURNING id"
RAW_POLL = "SELECT status, claimed_at, NULL::timestamptz, NULL::text FROM bench.raw_jobs WHERE id = %s"
JOB_INSERT = "INSERT INTO imagen.jobs (owner_user_id, prompt, params) VALUES (%s, 'bench', %s) RETURNING id"
JOB_POLL = "SELECT status, claimed_at, finished_at, error FROM imagen.jobs WHERE id = %s"


@dataclass
class _Idle:
    """Everything the interleaved latency rounds talk to."""

    conn: psycopg.Connection[Any]
    poller: psycopg.Connection[Any]
    listen: psycopg.Connection[Any]
    client: redis.Redis
    broker: RedisBroker
    owner: uuid.UUID


class _Run:
    """The phases of one run; every server, process and folder it makes is on the ExitStack."""

    def __init__(self, config: BenchConfig, echo: Echo, stack: contextlib.ExitStack) -> None:
        self.config = config
        self.echo = echo
        self.report = Report(config)
        self.random = random.Random(6)
        self.root = Path(tempfile.mkdtemp(prefix="imagen-bench-"))
        stack.callback(shutil.rmtree, self.root, ignore_errors=True)
        self.pg = PostgresServer()
        stack.callback(self.pg.cleanup)
        self.redis = RedisServer()
        stack.callback(self.redis.cleanup)
        self.bare_folder = self.root / "bare"

    def start_servers(self) -> None:
        from imagen.db import migrate

        self.echo("starting PostgreSQL and Redis")
        self.pg.start()
        self.redis.start()
        self.db_url = self.pg.url
        self.bare_url = self.redis.url[: -len("/0")] + "/1"
        migrate(self.db_url)
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            conn.execute(RAW_SCHEMA.encode())
            row = conn.execute("SHOW server_version").fetchone()
        self.report.machine = describe_machine()
        self.report.machine["postgres"] = row[0] if row else None
        info = redis.Redis.from_url(self.redis.url).info("server")
        self.report.machine["redis"] = info.get("redis_version")
        self.bare_folder.mkdir()
        (self.bare_folder / "bench_actors.py").write_text(BARE_ACTORS)
        (self.root / "raw_claimer.py").write_text(RAW_CLAIMER)
        self.pipeline_env = _clean_env(pipeline_env(self.db_url, self.redis.url, self.root / "pipeline"))

    def _gap(self, gap_ms: tuple[float, float] | None = None) -> None:
        time.sleep(self.random.uniform(*(gap_ms or self.config.gap_ms)) / 1000)

    # the processes

    @contextlib.contextmanager
    def _raw_claimer(self) -> Iterator[Proc]:
        env = _clean_env(BENCH_DATABASE_URL=self.db_url)
        with _processes(env, self.root / "raw") as procs:
            proc = _spawn(procs, "raw-claimer", [sys.executable, str(self.root / "raw_claimer.py")])
            _wait_for(lambda: _ready(proc, "raw claimer ready"), 30, "the raw claimer")
            yield proc

    @contextlib.contextmanager
    def _bare_workers(self, kind: str, n: int, **extra: str) -> Iterator[Proc]:
        env = _clean_env(BENCH_REDIS_URL=self.bare_url, BENCH_BROKER=kind, **extra)
        argv = [sys.executable, "-m", "dramatiq", "bench_actors", "--path", str(self.bare_folder)]
        argv += ["-p", str(n), "-t", str(self.config.threads)]
        with _processes(env, self.bare_folder / f"{kind}-{n}") as procs:
            proc = _spawn(procs, "bare-workers", argv)
            _wait_for(lambda: _ready(proc, DRAMATIQ_READY, n), 60, f"{n} bare Dramatiq worker(s)")
            yield proc

    @contextlib.contextmanager
    def _pipeline(self, n: int) -> Iterator[tuple[Proc, Proc]]:
        """`dramatiq imagen.actors -p n` and `imagen listen`, as an operator starts them."""
        with _processes(self.pipeline_env, self.root / "pipeline" / f"p{n}") as procs:
            workers = procs.start_workers(processes=n, threads=self.config.threads)
            _wait_for(lambda: _ready(workers, DRAMATIQ_READY, n), 60, f"{n} imagen worker(s)")
            listener = procs.start_listener()
            _wait_for(lambda: listeners_listening(self.db_url) > 0, 30, "the listener's LISTEN")
            yield listener, workers

    # the phases

    def measure(self) -> None:
        """Latency rounds and the widest throughput pair with everything up, then the other widths."""
        widths = sorted(self.config.workers, reverse=True)
        top = widths[0]
        client = redis.Redis.from_url(self.bare_url)
        broker = WakingRedisBroker(url=self.bare_url)
        try:
            with (
                self._raw_claimer() as claimer,
                self._bare_workers("imagen", top) as bare,
                self._pipeline(top) as (listener, workers),
            ):
                self._warm_chains(client, broker)
                self._warm_jobs()
                pids = {"raw_claimer": claimer.popen.pid, "listener": listener.popen.pid}
                pids |= process_tree(f"dramatiq_{top}w", bare.popen.pid)
                pids |= process_tree(f"worker_{top}w", workers.popen.pid)
                self._rest_memory(pids)
                self._latency_rounds(client, broker)
                self._chain_throughput(client, broker, bare, top)
                self._job_throughput(listener, workers, top)
            for n in widths[1:]:
                client.flushdb()
                with self._bare_workers("imagen", n) as bare:
                    self._warm_chains(client, broker)
                    self._rest_memory(process_tree(f"dramatiq_{n}w", bare.popen.pid))
                    self._chain_throughput(client, broker, bare, n)
                with self._pipeline(n) as (listener, workers):
                    self._warm_jobs()
                    self._rest_memory(process_tree(f"worker_{n}w", workers.popen.pid))
                    self._job_throughput(listener, workers, n)
            self._stock_references(client)
        finally:
            broker.close()
            client.close()

    def _latency_rounds(self, client: redis.Redis, broker: RedisBroker) -> None:
        """Sequential samples of every series, interleaved in a shuffled order each round, so a
        noisy neighbour hits the pipeline and its baselines alike."""
        n = self.config.samples
        self.echo(f"latency: {n} rounds of raw NOTIFY, raw claim, bare hop, bare chain and one pipeline job")
        values: dict[str, list[float]] = {}
        with (
            psycopg.connect(self.db_url, autocommit=True) as conn,
            psycopg.connect(self.db_url, autocommit=True) as poller,
            psycopg.connect(self.db_url, autocommit=True) as listen,
        ):
            listen.execute("LISTEN bench_probe")
            idle = _Idle(conn, poller, listen, client, broker, uuid.uuid4())
            samplers: dict[str, Callable[[_Idle, int], dict[str, float]]] = {
                "raw_notify": self._notify_sample,
                "raw_claim": self._raw_claim_sample,
                "dramatiq_hop": self._hop_sample,
                "dramatiq_chain": self._bare_chain_sample,
                "pipeline": self._job_sample,
            }
            for i in range(n):
                order = list(samplers)
                self.random.shuffle(order)
                for name in order:
                    for key, value in samplers[name](idle, i).items():
                        values.setdefault(key, []).append(value * 1000)
                    self._gap()
        for key, samples in values.items():
            self.report.latency[key] = Summary.of(samples)

    def _notify_sample(self, idle: _Idle, i: int) -> dict[str, float]:
        started = time.perf_counter()
        idle.conn.execute("INSERT INTO bench.probe DEFAULT VALUES")
        with contextlib.closing(idle.listen.notifies(timeout=5, stop_after=1)) as stream:
            if next(stream, None) is None:
                raise BenchError("no NOTIFY from bench.probe within 5 s")
        return {"raw_notify": time.perf_counter() - started}

    def _hop_sample(self, idle: _Idle, i: int) -> dict[str, float]:
        return {"dramatiq_hop": self._chain_sample(idle.client, idle.broker, "bench-hop", "hop", i)}

    def _bare_chain_sample(self, idle: _Idle, i: int) -> dict[str, float]:
        return {"dramatiq_chain": self._chain_sample(idle.client, idle.broker, "bench-1", "stage1", i)}

    def _raw_claim_sample(self, idle: _Idle, i: int) -> dict[str, float]:
        probe = self._row_sample(idle, RAW_INSERT, (), RAW_POLL, until_done=False)
        return {"raw_claim": probe.claim_seen, "raw_claim_clock": probe.claim_clock}

    def _job_sample(self, idle: _Idle, i: int) -> dict[str, float]:
        probe = self._row_sample(idle, JOB_INSERT, (idle.owner, Jsonb(JOB_PARAMS)), JOB_POLL, until_done=True)
        assert probe.done_clock is not None and probe.done_seen is not None
        return {
            "pickup": probe.claim_seen,
            "pickup_clock": probe.claim_clock,
            "done": probe.done_clock,
            "done_poll": probe.done_seen,
        }

    def _row_sample(
        self, idle: _Idle, insert: str, params: tuple[Any, ...], poll: str, *, until_done: bool
    ) -> _Probe:
        """Insert one row and poll it (no LISTEN) until claimed, or done.

        `claim_seen`: from the INSERT's commit returning to the first poll that sees the row
        claimed. `claim_clock`: the server's claimed_at minus the client's commit time (one
        clock on one host). `done_clock`: finished_at minus the time the INSERT was sent;
        `done_seen`: from the INSERT sent to the poll that sees it done.
        """
        sent_wall, sent = time.time(), time.perf_counter()
        row = idle.conn.execute(insert, params).fetchone()
        committed, committed_wall = time.perf_counter(), time.time()
        assert row is not None
        seen, claimed_at, finished_at, done_seen = self._watch(idle.poller, poll, row[0], until_done)
        return _Probe(
            claim_seen=seen - committed,
            claim_clock=claimed_at.timestamp() - committed_wall,
            done_clock=finished_at.timestamp() - sent_wall if finished_at else None,
            done_seen=done_seen - sent if done_seen else None,
        )

    def _watch(
        self, conn: psycopg.Connection[Any], sql: str, row_id: Any, until_done: bool
    ) -> tuple[float, Any, Any, float | None]:
        """Poll one row: (claim seen, claimed_at, finished_at, done seen), perf_counter seconds."""
        seen: float | None = None
        deadline = time.perf_counter() + 30
        while True:
            found = conn.execute(sql, (row_id,), prepare=True).fetchone()
            now = time.perf_counter()
            assert found is not None
            status, claimed_at, finished_at, error = found
            if seen is None and status != "pending":
                seen = now
                if not until_done:
                    return seen, claimed_at, None, None
            if status in ("done", "failed", "cancelled"):
                if status != "done":
                    raise BenchError(f"job {row_id} ended {status}: {error}")
                assert seen is not None
                return seen, claimed_at, finished_at, now
            if now > deadline:
                raise BenchError(f"row {row_id} still {status} after 30 s")
            time.sleep(POLL_CLAIM if seen is None else POLL_DONE)

    def _chain_sample(
        self, client: redis.Redis, broker: RedisBroker, queue: str, actor: str, i: int
    ) -> float:
        """Enqueue one message; seconds until the last actor ran (its time.time(), same host clock)."""
        started = time.time()
        broker.enqueue(Message(queue_name=queue, actor_name=actor, args=(i,), kwargs={}, options={}))
        got = client.blpop([DONE_KEY], timeout=30)
        if got is None:
            raise BenchError(f"{actor} message {i} did not finish within 30 s")
        token, stamp = _text(got[1]).split()
        if int(token) != i:
            raise BenchError(f"{actor}: expected token {i}, got {token}")
        return float(stamp) - started

    def _stock_references(self, client: redis.Redis) -> None:
        """Stock RedisBroker chains for reference: worker_timeout=20, and the defaults on an idle queue."""
        top = max(self.config.workers)
        stock = RedisBroker(url=self.bare_url)
        try:
            for key, samples, gap, extra in (
                (
                    "dramatiq_chain_stock_t20",
                    self.config.samples,
                    self.config.gap_ms,
                    {"dramatiq_worker_timeout": "20"},
                ),
                ("dramatiq_chain_stock", self.config.stock_samples, self.config.idle_gap_ms, {}),
            ):
                client.flushdb()
                self.echo(f"reference: {LATENCY_LABELS[key]} ({samples} samples)")
                with self._bare_workers("stock", top, **extra):
                    self._warm_chains(client, stock)
                    out = []
                    for i in range(samples):
                        out.append(self._chain_sample(client, stock, "bench-1", "stage1", i) * 1000)
                        self._gap(gap)
                    self.report.latency[key] = Summary.of(out)
        finally:
            stock.close()

    # throughput

    def _warm_chains(self, client: redis.Redis, broker: RedisBroker) -> None:
        client.delete(DONE_KEY)
        self._inject(client, broker, self.config.warmup)
        _wait_for(lambda: client.llen(DONE_KEY) >= self.config.warmup, 60, "warm-up chains")
        client.delete(DONE_KEY)

    def _inject(self, client: redis.Redis, broker: RedisBroker, n: int) -> None:
        """Put n first-stage messages on the queue at once (one MULTI), as one INSERT puts n jobs."""
        queue = "bench-1"
        encoded = {}
        for i in range(n):
            rid = str(uuid.uuid4())
            options = {"redis_message_id": rid}
            message: Message[Any] = Message(
                queue_name=queue, actor_name="stage1", args=(i,), kwargs={}, options=options
            )
            encoded[rid] = message.encode()
        pipe = client.pipeline(transaction=True)
        pipe.hset(f"{broker.namespace}:{queue}.msgs", mapping=encoded)  # type: ignore[arg-type]
        pipe.rpush(f"{broker.namespace}:{queue}", *encoded)
        if isinstance(broker, WakingRedisBroker):
            # What n enqueues leave behind: up to MAX_WAKE_TOKENS tokens, so every idle consumer wakes.
            pipe.rpush(broker.wake_key(queue), *[1] * min(n, MAX_WAKE_TOKENS))
        pipe.execute()

    def _chain_throughput(self, client: redis.Redis, broker: RedisBroker, proc: Proc, n: int) -> None:
        self.echo(f"throughput: bare 3-stage chain from a backlog of {self.config.jobs}, -p {n}")
        client.delete(DONE_KEY)
        jobs = self.config.jobs
        with MemoryWatch(process_tree(f"dramatiq_{n}w", proc.popen.pid)) as watch:
            self._inject(client, broker, jobs)
            started = time.time()
            capped = self._drain(
                lambda: int(client.llen(DONE_KEY)) >= jobs, proc, started, f"bare chain -p {n}"
            )
        self._load_memory(watch.peaks)
        stamps = [float(_text(item).split()[1]) for item in client.lrange(DONE_KEY, 0, -1)]
        if not stamps:
            raise BenchError("no chain finished")
        end = time.time() if capped else max(stamps)
        self.report.throughput[f"chain_{n}w"] = Throughput(len(stamps), end - started, capped=capped)

    def _job_throughput(self, listener: Proc, workers: Proc, n: int) -> None:
        self.echo(f"throughput: pipeline from a backlog of {self.config.jobs} jobs, -p {n}")
        owners = [uuid.uuid4() for _ in range(self.config.owners)]
        jobs = self.config.jobs
        pids = {"listener": listener.popen.pid, **process_tree(f"worker_{n}w", workers.popen.pid)}
        with psycopg.connect(self.db_url, autocommit=True) as conn, MemoryWatch(pids) as watch:
            self._insert_jobs(conn, owners, jobs)
            started = time.time()
            capped = self._drain(
                lambda: sum(self._progress(conn, owners)[:2]) >= jobs, workers, started, f"pipeline -p {n}"
            )
            done, failed, last = self._progress(conn, owners)
            if capped:
                conn.execute(
                    "UPDATE imagen.jobs SET status = 'cancelled'"
                    " WHERE owner_user_id = ANY(%s) AND status IN ('pending', 'running')",
                    (owners,),
                )
        self._load_memory(watch.peaks)
        if failed:
            self.report.notes.append(f"-p {n}: {failed} of {jobs} backlog jobs did not end done")
        end = time.time() if capped or last is None else last.timestamp()
        self.report.throughput[f"pipeline_{n}w"] = Throughput(
            done, end - started, failed=failed, capped=capped
        )

    def _drain(self, finished: Callable[[], bool], proc: Proc, started: float, label: str) -> bool:
        """Wait for a backlog to drain; True when the time cap stopped the wait."""
        while not finished():
            if not proc.alive():
                raise BenchError(f"{proc.name} died under load:\n{proc.tail(2000)}")
            if time.time() - started > self.config.throughput_timeout:
                self.report.notes.append(
                    f"{label}: the backlog was not drained in {self.config.throughput_timeout:.0f} s;"
                    " the rate is from what finished by then"
                )
                return True
            time.sleep(0.1)
        return False

    def _insert_jobs(self, conn: psycopg.Connection[Any], owners: list[uuid.UUID], n: int) -> None:
        conn.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, params)"
            " SELECT (%s::uuid[])[1 + i %% %s], 'bench ' || i, %s FROM generate_series(1, %s) i",
            (owners, len(owners), Jsonb(JOB_PARAMS), n),
        )

    def _progress(self, conn: psycopg.Connection[Any], owners: list[uuid.UUID]) -> tuple[int, int, Any]:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE status = 'done'),"
            " count(*) FILTER (WHERE status IN ('failed', 'cancelled')), max(finished_at)"
            " FROM imagen.jobs WHERE owner_user_id = ANY(%s)",
            (owners,),
        ).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), row[2]

    def _warm_jobs(self) -> None:
        owners = [uuid.uuid4()]
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            self._insert_jobs(conn, owners, self.config.warmup)
            _wait_for(lambda: sum(self._progress(conn, owners)[:2]) >= self.config.warmup, 60, "warm-up jobs")

    # memory

    def _rest_memory(self, pids: dict[str, int]) -> None:
        time.sleep(0.5)  # let the warm-up's garbage go before calling it rest
        for name, pid in pids.items():
            memory = self.report.memory.setdefault(name, Memory())
            if memory.rest is None:
                memory.rest = rss_mb(pid)

    def _load_memory(self, peaks: dict[str, float]) -> None:
        for name, peak in peaks.items():
            memory = self.report.memory.setdefault(name, Memory())
            memory.load = max(peak, memory.load or 0.0)


@dataclass
class _Probe:
    """One sequential sample in seconds (see `_Run._row_sample`); None where it does not apply."""

    claim_seen: float
    claim_clock: float
    done_clock: float | None = None
    done_seen: float | None = None


def cpu_pressure() -> float | None:
    """The share of the last 60 s in which some runnable task waited for a CPU (Linux PSI), in %."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    return float(fields["avg60"]) if "avg60" in fields else None


def describe_machine() -> dict[str, Any]:
    """What the figures depend on: CPUs, CPU model, memory, load, versions."""
    import dramatiq

    def first(path: str, prefix: str) -> str | None:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        except OSError:
            return None
        return None

    mem = first("/proc/meminfo", "MemTotal")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": first("/proc/cpuinfo", "model name"),
        "memory_mb": int(mem.split()[0]) // 1024 if mem else None,
        "loadavg": os.getloadavg(),
        "cpu_pressure": cpu_pressure(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dramatiq": dramatiq.__version__,
        "psycopg": psycopg.__version__,
    }


def run_bench(config: BenchConfig, echo: Echo | None = None) -> Report:
    """Run every phase on fresh servers; stop all processes and servers however it ends."""
    started = time.monotonic()

    def say(line: str) -> None:
        if echo is not None:
            echo(f"[{time.monotonic() - started:5.1f}s] {line}")

    with _interrupt_on_sigterm(), contextlib.ExitStack() as stack:
        run = _Run(config, say, stack)
        try:
            run.start_servers()
            run.measure()
        except BaseException:
            # A second Ctrl-C must not cut the clean-up short.
            previous = (
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                if threading.current_thread() is threading.main_thread()
                else None
            )
            try:
                stack.close()
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)
            raise
        run.report.machine["loadavg_end"] = os.getloadavg()
        run.report.machine["cpu_pressure_end"] = cpu_pressure()
        busy = run.report.machine["loadavg"][0]
        if busy > run.report.machine["nproc"]:
            run.report.notes.append(
                f"the machine was busy before the run (load average {busy:.1f} on {run.report.machine['nproc']}"
                " CPUs): other work competed for the CPUs, so figures are inflated; compare ratios and rerun"
            )
        run.report.elapsed_s = time.monotonic() - started
        say("finished")
        return run.report
