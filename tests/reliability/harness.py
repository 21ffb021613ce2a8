"""The reliability harness: private servers, the real processes, one invariant.

Each test module gets its own PostgreSQL cluster and Redis server on free ports
(imagen.devtools.servers), so a scenario may stop, crash or restart them; each test gets
a fresh database copied from a migrated template and a flushed Redis. The
pipeline runs as operators run it (`imagen listen`, `dramatiq imagen.actors`,
through imagen.devtools.runner) with a short lease and poll so recovery happens in
seconds. After every scenario `check_invariants` proves the user's promise
and returns the figures the scenario reports. It must never touch the
machine's shared PostgreSQL or Redis, and never fix up rows it checks.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import redis
from psycopg.types.json import Jsonb

from imagen import db
from imagen.devtools.runner import PipelineProcesses, Proc, pipeline_env
from imagen.devtools.servers import PostgresServer, RedisServer, free_port
from imagen.handoff import PREFIX as HANDOFF_PREFIX
from tests.waiting import wait_until

T = TypeVar("T")

TERMINAL = ("done", "failed", "cancelled")
BUCKET = "imagen"
# A heartbeat may be this much older than lease + poll before it counts as stuck: the rescue
# runs after the drain on each poll, and a 2-core machine under load schedules late.
LEASE_SLACK = 3.0
PROVIDER_SECRETS = (
    "OPENAI_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY",
)  # fmt: skip
_SPOOLED_LINE = re.compile(r"; spooled call ([0-9a-f-]{36})")
_DONE_LINE = re.compile(r"job ([0-9a-f-]{36}) attempt=(\d+) stage=finalizing done\b")


@dataclass
class Servers:
    """A module's private PostgreSQL cluster and Redis server, plus a migrated template database."""

    pg: PostgresServer
    redis: RedisServer
    template: str

    @classmethod
    def start(cls) -> Servers:
        pg, rds = PostgresServer(), RedisServer()
        pg.start()
        rds.start()
        template = f"imagen_tpl_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{template}"')
        db.migrate(pg.url_for(template))
        return cls(pg, rds, template)

    def new_database(self) -> str:
        name = f"imagen_r_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.pg.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        return name

    def drop_database(self, name: str) -> None:
        if self.pg.proc is None:
            self.pg.start()
        with psycopg.connect(self.pg.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def flush_redis(self) -> None:
        if self.redis.proc is None:
            self.redis.start()
        client = redis.Redis.from_url(self.redis.url)
        client.flushall()
        client.close()

    def cleanup(self) -> None:
        self.pg.cleanup()
        self.redis.cleanup()


@dataclass(frozen=True)
class Tuning:
    """Pipeline settings for a scenario: production's shape, compressed to seconds."""

    lease_seconds: float = 3.0
    poll_interval: float = 1.0
    handoff_ttl: int = 10
    # Above the default 3: with a 3 s lease, a worker restart can cost a job two rescues.
    max_attempts: int = 5
    stage_retries: int = 3
    retry_min_backoff_ms: int = 50
    retry_max_backoff_ms: int = 500
    max_in_flight: int = 64
    claim_batch: int = 100
    extra: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {
            "IMAGEN_LEASE_SECONDS": str(self.lease_seconds),
            "IMAGEN_POLL_INTERVAL": str(self.poll_interval),
            "IMAGEN_HANDOFF_TTL": str(self.handoff_ttl),
            "IMAGEN_MAX_ATTEMPTS": str(self.max_attempts),
            "IMAGEN_STAGE_RETRIES": str(self.stage_retries),
            "IMAGEN_RETRY_MIN_BACKOFF_MS": str(self.retry_min_backoff_ms),
            "IMAGEN_RETRY_MAX_BACKOFF_MS": str(self.retry_max_backoff_ms),
            "IMAGEN_MAX_IN_FLIGHT": str(self.max_in_flight),
            "IMAGEN_CLAIM_BATCH": str(self.claim_batch),
            # A dramatiq consumer that lost Redis restarts after this many ms (default 3000).
            "dramatiq_restart_delay": "500",
            # The tests simulate slow and failing providers with the mock's delay_ms and fail.
            "IMAGEN_JOB_TEST_OPTIONS": "true",
            **self.extra,
        }


@dataclass
class Sample:
    at: float
    oldest_heartbeat: float | None
    rescuer_up: bool


class LeaseMonitor:
    """Samples the oldest heartbeat of running jobs and whether a rescuer (listener) is connected."""

    def __init__(self, db_url: str, interval: float = 0.2) -> None:
        self.db_url = db_url
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn: psycopg.Connection[Any] | None = None
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.db_url, autocommit=True, connect_timeout=2)
                row = conn.execute(
                    "SELECT extract(epoch FROM now() - min(heartbeat_at)),"
                    " (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    "  AND application_name = 'imagen-listener-claims')"
                    " FROM imagen.jobs WHERE status = 'running'"
                ).fetchone()
                assert row is not None
                age = float(row[0]) if row[0] is not None else None
                self.samples.append(Sample(now, age, bool(row[1])))
            except psycopg.Error:
                if conn is not None:
                    conn.close()
                conn = None
                self.samples.append(Sample(now, None, False))
        if conn is not None:
            conn.close()

    def violations(self, bound: float) -> list[str]:
        """Samples where a running job's heartbeat outlived lease + poll while a rescuer was up.

        The time no rescuer was connected (listener killed, database down) inside the
        heartbeat's age extends the bound: nobody can rescue while nobody is there.
        """
        down: list[tuple[float, float]] = []
        for before, after in zip(self.samples, self.samples[1:], strict=False):
            if not before.rescuer_up or not after.rescuer_up:
                down.append((before.at, after.at))
        found = []
        for sample in self.samples:
            age = sample.oldest_heartbeat
            if age is None or age <= bound:
                continue
            since = sample.at - age
            outage = sum(max(0.0, min(end, sample.at) - max(start, since)) for start, end in down)
            if age > bound + outage:
                found.append(f"oldest heartbeat {age:.1f}s > {bound:.1f}s + {outage:.1f}s without a rescuer")
        return found

    def oldest(self) -> float:
        return max((s.oldest_heartbeat or 0.0 for s in self.samples), default=0.0)


class Harness:
    """One scenario: a fresh database, the module's servers, the real processes, its figures."""

    def __init__(
        self, name: str, servers: Servers, workdir: Path, figures_file: Path, tuning: Tuning | None = None
    ) -> None:
        self.name = name
        self.servers = servers
        self.workdir = workdir
        self.figures_file = figures_file
        self.tuning = tuning or Tuning()
        self._dead_port = free_port()
        self.db_name = servers.new_database()
        servers.flush_redis()
        self.procs = PipelineProcesses(self._env(), workdir / "logs")
        self.figures: dict[str, Any] = {}
        # Processes killed with SIGKILL: a provider call they had answered but not yet recorded
        # is the one loss the usage rule allows (docs/reliability.md).
        self.killed_pids: set[int] = set()
        self.started = time.monotonic()
        self.monitor = LeaseMonitor(self.db_url)
        self.monitor.start()

    @property
    def db_url(self) -> str:
        return self.servers.pg.url_for(self.db_name)

    @property
    def redis_url(self) -> str:
        return self.servers.redis.url

    @property
    def storage_root(self) -> Path:
        return self.workdir / "storage" / BUCKET

    @property
    def mock_calls(self) -> Path:
        return self.workdir / "mock-calls.log"

    @property
    def usage_spool(self) -> Path:
        return self.workdir / "usage-spool"

    def _env(self) -> dict[str, str]:
        env = pipeline_env(self.db_url, self.redis_url, self.workdir, **self.tuning.env())
        # Nothing reaches the internet or a real account: no inherited keys, providers on a dead port.
        for name in PROVIDER_SECRETS:
            env.pop(name, None)
        env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{self._dead_port}/v1"
        env["GOOGLE_GEMINI_BASE_URL"] = f"http://127.0.0.1:{self._dead_port}"
        # The mock provider's own record of the calls it answered: what imagen.usage must match.
        env["IMAGEN_MOCK_CALL_LOG"] = str(self.mock_calls)
        return env

    def retune(self, **changes: Any) -> None:
        """Change settings for processes started from now on."""
        self.tuning = Tuning(**{**self.tuning.__dict__, **changes})
        self.procs.env = self._env()

    def set_env(self, **values: str) -> None:
        self.procs.env = {**self.procs.env, **values}

    # processes

    def start_workers(self, processes: int = 1, threads: int = 4, *extra: str, wait: bool = True) -> Proc:
        """`dramatiq imagen.actors -p processes -t threads *extra` (for example `--queues ...`)."""
        proc = self.procs.start_workers(processes, threads, *extra)
        if wait:
            self.wait(lambda: proc.ready_count() >= processes, 30, "workers ready")
        return proc

    def start_listener(self, *, wait: bool = True) -> Proc:
        before = self.listeners_connected()
        proc = self.procs.start_listener()
        if wait:
            self.wait(lambda: self.listeners_connected() > before, 30, "listener connected")
        return proc

    def listeners_connected(self) -> int:
        return int(
            self.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'imagen-listener' AND backend_type = 'client backend'"
            )
        )

    def kill(self, proc: Proc) -> None:
        """SIGKILL a process and everything in its group (a dramatiq master and its workers)."""
        self.killed_pids |= group_pids(proc.popen.pid)
        proc.kill_group()
        proc.wait(10)

    def alive(self, name: str) -> list[Proc]:
        return [p for p in self.procs.procs if p.name == name and p.alive()]

    def logs(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.log.name} ---\n{p.tail(chars)}" for p in self.procs.procs)

    def all_log_text(self) -> str:
        logs = sorted((self.workdir / "logs").glob("*.log"))
        return "\n".join(path.read_text(errors="replace") for path in logs)

    def close(self) -> None:
        self.monitor.stop()
        for proc in self.procs.procs:
            proc.kill_group()
        for proc in self.procs.procs:
            proc.popen.wait(10)

    # the database

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.db_url, autocommit=True, connect_timeout=5)

    def query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with self.connect() as conn:
            return conn.execute(sql, args).fetchall()

    def scalar(self, sql: str, *args: Any) -> Any:
        rows = self.query(sql, *args)
        return rows[0][0] if rows else None

    def insert_backlog(
        self, count: int, params: dict[str, Any], *, owners: int = 4, prompt: str = "job"
    ) -> list[uuid.UUID]:
        """Insert `count` pending jobs in one statement (one notification), spread over owners."""
        owner_ids = [uuid.uuid4() for _ in range(owners)]
        rows = self.query(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, params)"
            " SELECT (%s::uuid[])[1 + i %% %s], %s || ' ' || i, %s FROM generate_series(1, %s) i RETURNING id",
            owner_ids,
            owners,
            prompt,
            Jsonb(params),
            count,
        )
        return [uuid.UUID(str(r[0])) for r in rows]

    def counts(self) -> Counter[str]:
        return Counter(dict(self.query("SELECT status, count(*) FROM imagen.jobs GROUP BY status")))

    def running_by_stage(self) -> Counter[str]:
        rows = self.query(
            "SELECT coalesce(stage, '-'), count(*) FROM imagen.jobs WHERE status = 'running' GROUP BY 1"
        )
        return Counter(dict(rows))

    def unfinished(self) -> int:
        return int(self.scalar("SELECT count(*) FROM imagen.jobs WHERE status IN ('pending', 'running')"))

    def wait(self, condition: Callable[[], T], timeout: float, message: str) -> T:
        """wait_until, with the job counts and the process logs attached to a timeout."""
        try:
            return wait_until(condition, timeout=timeout, interval=0.05, message=message)
        except AssertionError as exc:
            try:
                counts = str(dict(self.counts()))
            except psycopg.Error as db_exc:
                counts = f"database: {db_exc}"
            raise AssertionError(f"{exc}\n{counts}\n{self.logs()}") from None

    def wait_terminal(self, job_ids: Sequence[uuid.UUID], timeout: float) -> float:
        """Wait until every given job is terminal; return the seconds it took."""
        started = time.monotonic()
        ids = list(job_ids)
        self.wait(
            lambda: (
                self.scalar(
                    "SELECT count(*) FROM imagen.jobs WHERE id = ANY(%s) AND status IN ('pending', 'running')",
                    ids,
                )
                == 0
            ),
            timeout,
            f"{len(ids)} jobs terminal",
        )
        return time.monotonic() - started

    @contextmanager
    def timed(self, key: str) -> Iterator[None]:
        started = time.monotonic()
        yield
        self.figures[key] = round(time.monotonic() - started, 2)

    # the end of a scenario

    def finish(self, *, deadline: float, expect_all_done: bool = True) -> dict[str, Any]:
        """Check the invariant, record the figures (JSON under the pytest tmp dir) and return them."""
        figures = check_invariants(self, deadline=deadline)
        if expect_all_done:
            assert figures["done"] == figures["jobs"], f"not all done: {figures}\n{self.logs()}"
        self.figures.update(figures)
        self.figures["scenario_s"] = round(time.monotonic() - self.started, 1)
        record_figures(self.figures_file, self.name, self.figures)
        print(f"\n{self.name}: {json.dumps(self.figures)}")
        return self.figures


def group_pids(pgid: int) -> set[int]:
    """The processes of a process group (a dramatiq master and its worker processes), from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            found.add(int(entry.name))
    return found


def check_invariants(h: Harness, *, deadline: float) -> dict[str, Any]:
    """The promise, checked after every scenario; returns the scenario's figures.

    - every job is terminal (done, failed or cancelled) within `deadline` seconds;
    - each done job has exactly one images row, linked by image_id, owned by the job's owner,
      at `{owner}/{job}.png`, and exactly that one storage object;
    - no images row and no storage object for a job that is not done (cancelled included);
    - every failed job carries a readable error;
    - no job stayed running past lease + poll while a rescuer was connected;
    - no hand-off key in Redis without a TTL, and none left once the TTL has passed;
    - no job was completed twice (one `done` transition per job in the worker logs);
    - every call the mock provider answered has exactly one imagen.usage row, and every mock
      usage row is a call it answered; the only call allowed no row is one a SIGKILLed worker
      had answered (counted, not hidden), once the workers' spools are empty.
    """
    problems: list[str] = []
    started = time.monotonic()
    try:
        h.wait(lambda: h.unfinished() == 0, deadline, f"every job terminal within {deadline}s")
    finally:
        h.monitor.stop()
    terminal_wait = time.monotonic() - started

    jobs = h.query(
        "SELECT id, owner_user_id, status, image_id, attempt, error FROM imagen.jobs ORDER BY created_at"
    )
    images = h.query("SELECT id, job_id, owner_user_id, bucket, path FROM imagen.images")
    images_by_job: dict[Any, list[tuple[Any, ...]]] = {}
    for image in images:
        images_by_job.setdefault(image[1], []).append(image)
    job_ids = {j[0] for j in jobs}
    status = Counter(j[2] for j in jobs)
    duplicates = sum(len(rows) - 1 for rows in images_by_job.values() if len(rows) > 1)
    expected_objects: set[Path] = set()
    for job_id, owner, state, image_id, _attempt, error in jobs:
        rows = images_by_job.get(job_id, [])
        path = h.storage_root / str(owner) / f"{job_id}.png"
        if state == "done":
            expected_objects.add(path)
            if len(rows) != 1:
                problems.append(f"done job {job_id} has {len(rows)} images rows")
                continue
            row_id, _, row_owner, bucket, row_path = rows[0]
            if image_id != row_id:
                problems.append(f"done job {job_id}: image_id {image_id} is not its images row {row_id}")
            if row_owner != owner or bucket != BUCKET or row_path != f"{owner}/{job_id}.png":
                problems.append(f"done job {job_id}: images row {row_owner} {bucket}/{row_path}")
            if not path.is_file():
                problems.append(f"done job {job_id}: no storage object at {path}")
        else:
            if rows:
                problems.append(f"{state} job {job_id} has {len(rows)} images rows")
            if image_id is not None:
                problems.append(f"{state} job {job_id} has image_id {image_id}")
            if path.exists():
                problems.append(f"{state} job {job_id} left a storage object")
            if state == "failed" and not (error or "").strip():
                problems.append(f"failed job {job_id} has no error text")
    strays = [j for j in images_by_job if j is not None and j not in job_ids]
    if strays:
        problems.append(f"{len(strays)} images rows for jobs that do not exist")
    objects = [p for p in h.storage_root.rglob("*") if p.is_file()] if h.storage_root.exists() else []
    partial = [p for p in objects if p.name.startswith(".upload-")]
    unexpected = [p for p in objects if p not in expected_objects and p not in partial]
    if unexpected:
        problems.append(f"{len(unexpected)} storage objects belong to no done job: {unexpected[:3]}")

    tuning = h.tuning
    bound = tuning.lease_seconds + tuning.poll_interval + LEASE_SLACK
    stuck = h.monitor.violations(bound)
    if stuck:
        problems.append(f"{len(stuck)} samples with a job running past lease + poll: {stuck[:3]}")

    handoff_left, handoff_wait = _check_handoff_keys(h, problems)

    done_lines = Counter(m.group(1) for m in _DONE_LINE.finditer(h.all_log_text()))
    twice = [job for job, n in done_lines.items() if n > 1]
    if twice:
        problems.append(f"{len(twice)} jobs completed more than once: {twice[:3]}")
    usage_figures = _check_usage(h, problems)
    regenerated = h.scalar(
        "SELECT count(*) FROM (SELECT job_id FROM imagen.usage GROUP BY job_id HAVING count(*) > 1) t"
    )
    assert not problems, "invariant broken:\n" + "\n".join(problems) + f"\n{h.logs()}"
    return {
        "jobs": len(jobs),
        "done": status.get("done", 0),
        "failed": status.get("failed", 0),
        "cancelled": status.get("cancelled", 0),
        "duplicates": duplicates + len(twice),
        "max_attempt": max((j[4] for j in jobs), default=0),
        "rescued_jobs": sum(1 for j in jobs if j[4] > 1),
        "regenerated_jobs": int(regenerated or 0),
        "oldest_heartbeat_s": round(h.monitor.oldest(), 1),
        "terminal_wait_s": round(terminal_wait, 1),
        "handoff_keys_left": handoff_left,
        "handoff_expiry_wait_s": round(handoff_wait, 1),
        "partial_uploads": len(partial),
        **usage_figures,
    }


def _check_usage(h: Harness, problems: list[str]) -> dict[str, Any]:
    """Usage rows against the mock provider's own call log: one row per answered call."""
    bound = h.tuning.poll_interval * 3 + 5
    try:
        wait_until(lambda: not _spooled(h), timeout=bound, interval=0.1, message="usage spool replayed")
    except AssertionError:
        problems.append(f"usage records still spooled after {bound:.0f}s: {_spooled(h)[:3]}")
    rejected = list((h.usage_spool / "rejected").glob("*.json")) if h.usage_spool.exists() else []
    if rejected:
        problems.append(f"{len(rejected)} spooled usage records refused by the database: {rejected[:3]}")
    calls: dict[str, int] = {}
    text = h.mock_calls.read_text() if h.mock_calls.exists() else ""
    for line in text.splitlines():
        call_id, pid, _ok = line.split()
        if call_id in calls:
            problems.append(f"the mock answered call {call_id} twice")
        calls[call_id] = int(pid)
    rows = h.query(
        "SELECT call_id::text, count(*), max(extract(epoch FROM written_at - created_at))"
        " FROM imagen.usage WHERE backend = 'mock' GROUP BY call_id"
    )
    # A spooled record's first durable write is its spool file, not its (later) row.
    spooled = set(_SPOOLED_LINE.findall(h.all_log_text()))
    written = {r[0]: r[1] for r in rows}
    twice = [c for c, n in written.items() if n != 1]
    if twice:
        problems.append(f"{len(twice)} provider calls with more than one usage row: {twice[:3]}")
    phantom = [c for c in written if c not in calls]
    if phantom:
        problems.append(f"{len(phantom)} usage rows for calls the provider never answered: {phantom[:3]}")
    missing = [c for c in calls if c not in written]
    lost_to_kill = [c for c in missing if calls[c] in h.killed_pids]
    unexplained = [c for c in missing if calls[c] not in h.killed_pids]
    if unexplained:
        problems.append(f"{len(unexplained)} provider calls without a usage row: {unexplained[:3]}")
    windows = sorted(float(r[2]) * 1000 for r in rows if r[2] is not None and r[0] not in spooled)
    return {
        "provider_calls": len(calls),
        "usage_rows": sum(written.values()),
        "usage_spooled": len(spooled),
        "usage_lost_to_sigkill": len(lost_to_kill),
        "usage_window_ms": _percentiles(windows),
    }


def _spooled(h: Harness) -> list[Path]:
    return list(h.usage_spool.glob("*.json")) if h.usage_spool.exists() else []


def _percentiles(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of sorted values, rounded (empty: {})."""
    if not values:
        return {}

    def at(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 1)

    return {"p50": at(0.5), "p99": at(0.99), "max": round(values[-1], 1)}


def _check_handoff_keys(h: Harness, problems: list[str]) -> tuple[int, float]:
    """Every hand-off key left must carry a TTL within the configured one, and be gone after it."""
    client = redis.Redis.from_url(h.redis_url)
    try:
        keys = list(client.scan_iter(match=f"{HANDOFF_PREFIX}:*", count=1000))
        ttl_ms = [client.pttl(key) for key in keys]
        limit = h.tuning.handoff_ttl * 1000
        bad = [(k, t) for k, t in zip(keys, ttl_ms, strict=True) if not 0 < t <= limit]
        if bad:
            problems.append(f"{len(bad)} hand-off keys without a TTL in (0, {limit}] ms: {bad[:3]}")
            return len(keys), 0.0
        if not keys:
            return 0, 0.0
        started = time.monotonic()
        wait_until(
            lambda: not any(client.exists(k) for k in keys),
            timeout=max(ttl_ms) / 1000 + 2,
            interval=0.1,
            message="hand-off keys expired",
        )
        return len(keys), time.monotonic() - started
    finally:
        client.close()


def record_figures(path: Path, scenario: str, figures: dict[str, Any]) -> None:
    """Add one scenario's figures to the suite's JSON file (scenario -> figures)."""
    data = json.loads(path.read_text()) if path.exists() else {}
    data[scenario] = figures
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
