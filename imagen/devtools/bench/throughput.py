"""The throughput phases of a run: backlogs drained by the bare chain and by the pipeline, and RSS.

A mixin of `imagen.devtools.bench.run.BenchRun`, which owns the servers and processes it measures.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.message import Message
from psycopg.types.json import Jsonb

from imagen.broker import MAX_WAKE_TOKENS, WakingRedisBroker
from imagen.devtools.bench.baselines import DONE_KEY
from imagen.devtools.bench.config import JOB_PARAMS, BenchConfig, BenchError, Echo
from imagen.devtools.bench.procs import MemoryWatch, proc_text, process_tree, rss_mb, wait_for
from imagen.devtools.bench.report import Memory, Report, Throughput
from imagen.devtools.bench.sql import QUERIES
from imagen.devtools.runner import Proc

# Is any of the backlog's jobs still pending, or running? (bench.sql says why it is two probes.)
BUSY = QUERIES["backlog_busy"]


class Backlogs:
    """The throughput and memory phases of `BenchRun`; the attributes are set by `BenchRun`."""

    config: BenchConfig
    echo: Echo
    report: Report
    db_url: str

    # throughput

    def _warm_chains(self, client: redis.Redis, broker: RedisBroker) -> None:
        client.delete(DONE_KEY)
        self._inject(client, broker, self.config.warmup)
        wait_for(lambda: client.llen(DONE_KEY) >= self.config.warmup, 60, "warm-up chains")
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

    def _backlog_rounds(
        self, client: redis.Redis, broker: RedisBroker, bare: Proc, listener: Proc, workers: Proc, n: int
    ) -> None:
        """The bare chain's backlog, then the pipeline's, `rounds` times: each pair a few seconds apart."""
        for i in range(self.config.rounds):
            label = f" (round {i + 1} of {self.config.rounds})" if self.config.rounds > 1 else ""
            self._chain_throughput(client, broker, bare, n, label)
            self._job_throughput(listener, workers, n, label)

    def _chain_throughput(
        self, client: redis.Redis, broker: RedisBroker, proc: Proc, n: int, label: str = ""
    ) -> None:
        self.echo(f"throughput: bare 3-stage chain from a backlog of {self.config.jobs}, -p {n}{label}")
        client.delete(DONE_KEY)
        jobs = self.config.jobs
        with MemoryWatch(process_tree(f"dramatiq_{n}w", proc.popen.pid)) as watch:
            self._inject(client, broker, jobs)
            rate = self._stamps_rate(client, DONE_KEY, jobs, proc, f"bare chain -p {n}")
        self._load_memory(watch.peaks)
        self.report.throughput.setdefault(f"chain_{n}w", []).append(rate)

    def _stamps_rate(self, client: redis.Redis, key: str, jobs: int, proc: Proc, label: str) -> Throughput:
        """Wait for `jobs` stamps ("<token> <time.time()>") in a Redis list; the rate from now, when
        the backlog is in, to the last stamp (or to the time cap)."""
        started = time.time()
        capped = self._drain(lambda: int(client.llen(key)) >= jobs, proc, started, label)
        stamps = [float(proc_text(item).split()[1]) for item in client.lrange(key, 0, -1)]
        if not stamps:
            raise BenchError(f"{label}: nothing finished")
        end = time.time() if capped else max(stamps)
        return Throughput(len(stamps), end - started, capped=capped)

    def _job_throughput(self, listener: Proc, workers: Proc, n: int, label: str = "") -> None:
        self.echo(f"throughput: pipeline from a backlog of {self.config.jobs} jobs, -p {n}{label}")
        owners = [uuid.uuid4() for _ in range(self.config.owners)]
        jobs = self.config.jobs
        pids = {"listener": listener.popen.pid, **process_tree(f"worker_{n}w", workers.popen.pid)}
        with psycopg.connect(self.db_url, autocommit=True) as conn, MemoryWatch(pids) as watch:
            self._insert_jobs(conn, owners, jobs)
            started = time.time()
            capped = self._drain(lambda: self._drained(conn, owners), workers, started, f"pipeline -p {n}")
            done, failed, last = self._progress(conn, owners)
            if capped:
                conn.execute(QUERIES["backlog_cancel"], {"owners": owners})
        self._load_memory(watch.peaks)
        if failed:
            self.report.notes.append(f"-p {n}: {failed} of {jobs} backlog jobs did not end done")
        end = time.time() if capped or last is None else last.timestamp()
        self.report.throughput.setdefault(f"pipeline_{n}w", []).append(
            Throughput(done, end - started, failed=failed, capped=capped)
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
        conn.execute(QUERIES["backlog_insert"], (owners, len(owners), Jsonb(JOB_PARAMS), n))

    def _drained(self, conn: psycopg.Connection[Any], owners: list[uuid.UUID]) -> bool:
        """Whether none of the owners' jobs is left pending or running.

        Two index probes that stop at the first row (tens of microseconds while jobs are pending,
        about half a millisecond in the tail), as the bare chain's check is one LLEN: counting the
        owners' rows (`_progress`) costs PostgreSQL ~5 ms a poll on a 10,000-job backlog, CPU the
        pipeline would lose to the harness and the chain would not.
        """
        row = conn.execute(BUSY, {"owners": owners}, prepare=True).fetchone()
        return bool(row and not row[0])

    def _progress(self, conn: psycopg.Connection[Any], owners: list[uuid.UUID]) -> tuple[int, int, Any]:
        row = conn.execute(QUERIES["backlog_progress"], {"owners": owners}).fetchone()
        assert row is not None
        return int(row[0]), int(row[1]), row[2]

    def _warm_jobs(self) -> None:
        owners = [uuid.uuid4()]
        with psycopg.connect(self.db_url, autocommit=True) as conn:
            self._insert_jobs(conn, owners, self.config.warmup)
            wait_for(lambda: sum(self._progress(conn, owners)[:2]) >= self.config.warmup, 60, "warm-up jobs")

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
