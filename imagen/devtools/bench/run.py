"""One benchmark run: fresh servers, the baselines' and the pipeline's processes, the phases in order.

Every server, process and folder a run makes is stopped or removed when it
returns, fails or is interrupted; it must never touch a configured database or Redis.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.message import Message
from psycopg.types.json import Jsonb

from imagen.broker import WakingRedisBroker
from imagen.devtools.bench.baselines import BARE_ACTORS, DONE_KEY, RAW_CLAIMER, RAW_SCHEMA
from imagen.devtools.bench.config import DURABLE_SETTINGS as DURABLE
from imagen.devtools.bench.config import JOB_PARAMS, BenchConfig, BenchError, Echo, default_scratch, size_note
from imagen.devtools.bench.machine import cpu_pressure, describe_machine, filesystem_type, postgres_settings
from imagen.devtools.bench.procs import (
    _interrupt_on_sigterm,
    _ready,
    clean_env,
    process_tree,
    processes,
    spawn,
    stamped,
    wait_for,
)
from imagen.devtools.bench.report import LATENCY_LABELS, Report, Summary
from imagen.devtools.bench.sql import QUERIES
from imagen.devtools.bench.throughput import Backlogs
from imagen.devtools.runner import DRAMATIQ_READY, Proc, listeners_listening, pipeline_env
from imagen.devtools.servers import PostgresServer, RedisServer

POLL_CLAIM = 0.0002  # seconds between polls while waiting for a claim
POLL_DONE = 0.001
RAW_INSERT = "INSERT INTO bench.raw_jobs DEFAULT VALUES RETURNING id"
RAW_POLL = "SELECT status, claimed_at, NULL::timestamptz, NULL::text FROM bench.raw_jobs WHERE id = %s"
# One job through the whole pipeline, inserted and polled (bench.sql).
JOB_INSERT = QUERIES["probe_insert"]
JOB_POLL = QUERIES["probe_poll"]


@dataclass
class _Idle:
    """Everything the interleaved latency rounds talk to."""

    conn: psycopg.Connection[Any]
    poller: psycopg.Connection[Any]
    listen: psycopg.Connection[Any]
    client: redis.Redis
    broker: RedisBroker
    owner: uuid.UUID


class BenchRun(Backlogs):
    """The phases of one run; every server, process and folder it makes is on the ExitStack."""

    def __init__(self, config: BenchConfig, echo: Echo, stack: contextlib.ExitStack) -> None:
        self.config = config
        self.echo = echo
        self.report = Report(config)
        self.random = random.Random(6)
        self.root = Path(tempfile.mkdtemp(prefix="imagen-bench-"))
        stack.callback(shutil.rmtree, self.root, ignore_errors=True)
        self.files = Path(
            tempfile.mkdtemp(prefix="imagen-bench-files-", dir=config.scratch or default_scratch())
        )
        stack.callback(shutil.rmtree, self.files, ignore_errors=True)
        self.pg = PostgresServer(settings=dict(DURABLE) if config.durable else {})
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
        self.report.machine["scratch"] = f"{self.files.parent} ({filesystem_type(self.files) or 'unknown'})"
        self.report.machine["postgres_settings"] = postgres_settings(self.db_url, DURABLE)
        self.bare_folder.mkdir()
        (self.bare_folder / "bench_actors.py").write_text(BARE_ACTORS)
        (self.root / "raw_claimer.py").write_text(RAW_CLAIMER)
        self.pipeline_env = clean_env(
            pipeline_env(self.db_url, self.redis.url, self.files, IMAGEN_JOB_TEST_OPTIONS="true")
        )

    def _gap(self, gap_ms: tuple[float, float] | None = None) -> None:
        time.sleep(self.random.uniform(*(gap_ms or self.config.gap_ms)) / 1000)

    # the processes

    @contextlib.contextmanager
    def _raw_claimer(self) -> Iterator[Proc]:
        env = clean_env(BENCH_DATABASE_URL=self.db_url)
        with processes(env, self.root / "raw") as procs:
            proc = spawn(procs, "raw-claimer", [sys.executable, str(self.root / "raw_claimer.py")])
            wait_for(lambda: _ready(proc, "raw claimer ready"), 30, "the raw claimer")
            yield proc

    @contextlib.contextmanager
    def _bare_workers(self, kind: str, n: int, **extra: str) -> Iterator[Proc]:
        env = clean_env(BENCH_REDIS_URL=self.bare_url, BENCH_BROKER=kind, **extra)
        argv = [sys.executable, "-m", "dramatiq", "bench_actors", "--path", str(self.bare_folder)]
        argv += ["-p", str(n), "-t", str(self.config.threads)]
        with processes(env, self.bare_folder / f"{kind}-{n}") as procs:
            proc = spawn(procs, "bare-workers", argv)
            wait_for(lambda: _ready(proc, DRAMATIQ_READY, n), 60, f"{n} bare Dramatiq worker(s)")
            yield proc

    @contextlib.contextmanager
    def _pipeline(self, n: int) -> Iterator[tuple[Proc, Proc]]:
        """`dramatiq imagen.actors -p n` and `imagen listen`, as an operator starts them."""
        with processes(self.pipeline_env, self.root / "pipeline" / f"p{n}") as procs:
            workers = procs.start_workers(processes=n, threads=self.config.threads)
            wait_for(lambda: _ready(workers, DRAMATIQ_READY, n), 60, f"{n} imagen worker(s)")
            listener = procs.start_listener()
            wait_for(lambda: listeners_listening(self.db_url) > 0, 30, "the listener's LISTEN")
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
                self._backlog_rounds(client, broker, bare, listener, workers, top)
            for n in widths[1:]:
                client.flushdb()
                with self._bare_workers("imagen", n) as bare, self._pipeline(n) as (listener, workers):
                    self._warm_chains(client, broker)
                    self._warm_jobs()
                    self._rest_memory(process_tree(f"dramatiq_{n}w", bare.popen.pid))
                    self._rest_memory(process_tree(f"worker_{n}w", workers.popen.pid))
                    self._backlog_rounds(client, broker, bare, listener, workers, n)
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
        probe = self._row_sample(idle.conn, idle.poller, RAW_INSERT, (), RAW_POLL, until_done=False)
        return {"raw_claim": probe.claim_seen, "raw_claim_clock": probe.claim_clock}

    def _job_sample(self, idle: _Idle, i: int) -> dict[str, float]:
        probe = self._row_sample(
            idle.conn, idle.poller, JOB_INSERT, (idle.owner, Jsonb(JOB_PARAMS)), JOB_POLL, until_done=True
        )
        assert probe.done_clock is not None and probe.done_seen is not None
        return {
            "pickup": probe.claim_seen,
            "pickup_clock": probe.claim_clock,
            "done": probe.done_clock,
            "done_poll": probe.done_seen,
        }

    def _row_sample(
        self,
        conn: psycopg.Connection[Any],
        poller: psycopg.Connection[Any],
        insert: str,
        params: tuple[Any, ...],
        poll: str,
        *,
        until_done: bool,
    ) -> _Probe:
        """Insert one row and poll it (no LISTEN) until claimed, or done.

        `claim_seen`: from the INSERT's commit returning to the first poll that sees the row
        claimed. `claim_clock`: the server's claimed_at minus the client's commit time (one
        clock on one host). `done_clock`: finished_at minus the time the INSERT was sent;
        `done_seen`: from the INSERT sent to the poll that sees it done.
        """
        sent_wall, sent = time.time(), time.perf_counter()
        row = conn.execute(insert, params).fetchone()
        committed, committed_wall = time.perf_counter(), time.time()
        assert row is not None
        seen, claimed_at, finished_at, done_seen = self._watch(poller, poll, row[0], until_done)
        return _Probe(
            row_id=row[0],
            sent_wall=sent_wall,
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
        """Enqueue one message; seconds until the last actor ran."""
        message: Message[Any] = Message(queue_name=queue, actor_name=actor, args=(i,), kwargs={}, options={})
        return stamped(client, DONE_KEY, lambda: broker.enqueue(message), i, f"{actor} message")

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


def execute(run_type: type[BenchRun], config: BenchConfig, echo: Echo | None) -> BenchRun:
    """Start a run's servers and measure, timing each line; whatever happens, every process and
    server it started is stopped before this returns or raises."""
    started = time.monotonic()

    def say(line: str) -> None:
        if echo is not None:
            echo(f"[{time.monotonic() - started:5.1f}s] {line}")

    with _interrupt_on_sigterm(), contextlib.ExitStack() as stack:
        run = run_type(config, say, stack)
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
        run.report.elapsed_s = time.monotonic() - started
        say("finished")
        return run


@dataclass
class _Probe:
    """One sequential sample in seconds (see `BenchRun._row_sample`); None where it does not apply."""

    row_id: Any
    sent_wall: float  # time.time() just before the INSERT was sent
    claim_seen: float
    claim_clock: float
    done_clock: float | None = None
    done_seen: float | None = None


def run_bench(config: BenchConfig, echo: Echo | None = None) -> Report:
    """Run every phase on fresh servers; stop all processes and servers however it ends."""
    report = execute(BenchRun, config, echo).report
    busy = report.machine["loadavg"][0]
    if busy > report.machine["nproc"]:
        report.notes.append(
            f"the machine was busy before the run (load average {busy:.1f} on {report.machine['nproc']}"
            " CPUs): other work competed for the CPUs, so figures are inflated; compare ratios and rerun"
        )
    note = size_note(config)
    if note:
        report.notes.append(note)
    settings = ", ".join(f"{k}={v}" for k, v in report.machine.get("postgres_settings", {}).items())
    report.notes.append(f"PostgreSQL {settings}; images under {report.machine.get('scratch')}")
    return report
