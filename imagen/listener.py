"""The listener: LISTEN on imagen_jobs, claim pending rows, forward them to Dramatiq.

It is small on purpose, and knows of images only to remove those of ended jobs.
Three parts, each with one job: the notifier (a dedicated LISTEN connection,
self-checked, reconnected with backoff), the claimer (fair batches with FOR
UPDATE SKIP LOCKED, committed before forwarding; a failed forward puts the row
back) and the rescuer (running rows whose lease expired go back to pending, or
fail at the maximum attempts; then the sweep removes the image of jobs that
ended failed or cancelled, `imagen.image_sweep`: the one place the listener
touches storage).
Notifications only wake it: on every wake it drains the whole backlog, so a lost
notification costs at most one safety poll. It must never reset running rows
wholesale: other hosts' in-flight work lives in Redis.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg

from imagen import jobs
from imagen.broker import GENERATE_ACTOR, GENERATE_QUEUE, build_broker, stage_message
from imagen.config import Settings
from imagen.db import describe_error
from imagen.errors import ConfigError
from imagen.logs import transition

if TYPE_CHECKING:
    from imagen.storage import Storage

log = logging.getLogger("imagen.listener")

CHANNEL = "imagen_jobs"
LISTEN_SQL = f"LISTEN {CHANNEL}"
# The LISTEN connection runs only these two statements, so `imagen.devtools.runner.listeners_listening` can
# find it in pg_stat_activity by its last query: application_name is no use for that, since
# Supavisor's session mode replaces it.
HEALTH_SQL = "SELECT count(*) FROM pg_listening_channels() c WHERE c = 'imagen_jobs'"
HEALTH_INTERVAL = 10.0
SATURATED_POLL = 0.01  # the shortest wait between counts while the in-flight cap is reached
SATURATED_POLL_MAX = 0.25  # the longest, while nothing finishes
MAX_BACKOFF = 5.0
SWEEP_BATCH = 100  # ended jobs a sweep visits per poll: each costs a storage call under its row lock


@dataclass
class ListenerStats:
    """Counters the listener keeps; exported as Prometheus metrics and used by tests."""

    claims: int = 0
    forward_failures: int = 0
    rescued: int = 0
    gave_up: int = 0
    swept: int = 0
    reconnects: int = 0
    mode: str = "starting"


class _Metrics:
    """Prometheus metrics for the listener, created only when a port is configured."""

    def __init__(self, port: int, addr: str) -> None:
        from prometheus_client import Counter, Gauge, Histogram, start_http_server

        self.claims = Counter("imagen_listener_claims", "Jobs claimed and forwarded to Dramatiq")
        self.forward_failures = Counter(
            "imagen_listener_forward_failures", "Claims put back after a failed forward"
        )
        self.rescues = Counter("imagen_listener_rescues", "Expired leases rescued", ["outcome"])
        self.reconnects = Counter("imagen_listener_reconnects", "Database reconnects of the listener")
        self.swept = Counter(
            "imagen_listener_swept_images",
            "Failed or cancelled jobs whose images row or object the sweep removed",
        )
        self.pickup = Histogram(
            "imagen_listener_pickup_seconds",
            "Pending (INSERT, or back to pending after a retry or rescue) to claim latency",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.mode = Gauge("imagen_listener_mode", "1 for the current mode", ["mode"])
        try:
            start_http_server(port, addr=addr)
        except OSError as exc:
            log.warning("metrics: cannot listen on %s:%s (%s); metrics disabled", addr, port, exc)

    def set_mode(self, mode: str) -> None:
        for name in ("listening", "reconnecting", "stopping"):
            self.mode.labels(name).set(1 if name == mode else 0)


class Listener:
    """Claims pending jobs and forwards them; `run()` blocks until `stop()`."""

    def __init__(
        self,
        settings: Settings,
        *,
        broker: Any = None,
        metrics_port: int | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.url = settings.require_database_url()
        self.broker = broker or build_broker(settings)
        self.stats = ListenerStats()
        self.on_event = on_event or (lambda event: None)
        self._stopping = threading.Event()
        self._listen_conn: psycopg.Connection[Any] | None = None
        self._work_conn: psycopg.Connection[Any] | None = None
        self._saturated = False
        self._saturated_wait = SATURATED_POLL
        self._last_count: tuple[float, int] | None = None  # (when, running) at the last count at the cap
        self._pace: float | None = None  # slots freed per second at the cap, from the last refill
        self._storage: Storage | None = None  # opened by the first sweep
        self._storage_error = ""
        self._refill = max(1, min(settings.claim_batch, settings.max_in_flight // 8))
        port = settings.listener_metrics_port if metrics_port is None else metrics_port
        self._metrics = _Metrics(port, settings.metrics_addr) if port else None

    def stop(self) -> None:
        """Stop claiming; the forward in hand finishes, then `run` returns."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _set_mode(self, mode: str) -> None:
        if self.stats.mode != mode:
            log.info("listener mode: %s", mode)
        self.stats.mode = mode
        if self._metrics:
            self._metrics.set_mode(mode)
        self.on_event(mode)

    def _connect(self) -> None:
        from imagen.db import check_schema, connect

        self._close()
        listen = connect(self.url, autocommit=True, application_name="imagen-listener")
        self._listen_conn = listen
        # Before anything else: a schema that was never migrated is a configuration error to
        # report (exit 78), not a connection to retry forever.
        check_schema(listen)
        # LISTEN before the catch-up claim: a row inserted in between is either seen by the
        # claim or announced by a notification, never missed by both.
        listen.execute(LISTEN_SQL)
        self._work_conn = connect(self.url, autocommit=True, application_name="imagen-listener-claims")

    def _close(self) -> None:
        for conn in (self._listen_conn, self._work_conn):
            if conn is not None:
                try:
                    conn.close()
                except psycopg.Error:
                    pass
        self._listen_conn = self._work_conn = None

    def run(self) -> None:
        """Listen, drain and rescue until stopped; reconnect with backoff on connection loss."""
        backoff = 0.05
        connected = False
        log.info(
            "listener starting: poll every %ss, lease %ss, max attempts %s, batch %s, in-flight cap %s",
            self.settings.poll_interval, self.settings.lease_seconds, self.settings.max_attempts,
            self.settings.claim_batch, self.settings.max_in_flight,
        )  # fmt: skip
        while not self.stopping:
            try:
                self._connect()
                connected = True
                self._set_mode("listening")
                backoff = 0.05
                self.drain()
                self.rescue()
                self.sweep()
                self._loop()
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                if self.stopping:
                    break
                problem = describe_error(exc)
                if isinstance(problem, ConfigError):
                    self._close()
                    raise problem from None  # a wrong database, role or password: retrying cannot help
                self.stats.reconnects += 1
                if self._metrics:
                    self._metrics.reconnects.inc()
                self._set_mode("reconnecting")
                if connected:
                    log.warning(
                        "listener lost its database connection (%s); reconnecting in %.2fs",
                        _first_line(exc),
                        backoff,
                    )
                else:
                    log.warning(
                        "listener cannot connect to the database (%s); trying again in %.2fs",
                        _first_line(exc),
                        backoff,
                    )
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except ConfigError:
                self._close()
                raise
        self._set_mode("stopping")
        self._close()
        log.info("listener stopped")

    def _loop(self) -> None:
        poll = self.settings.poll_interval
        next_poll = time.monotonic() + poll
        next_health = time.monotonic() + HEALTH_INTERVAL
        while not self.stopping:
            now = time.monotonic()
            deadline = min(next_poll, next_health)
            if self._saturated:
                deadline = min(deadline, now + self._saturated_wait)
            notified = self._wait(max(0.0, deadline - now))
            if self.stopping:
                return
            now = time.monotonic()
            if notified or now >= next_poll or self._saturated:
                self.drain()
            if now >= next_poll:
                self.rescue()
                self.sweep()
                next_poll = now + poll
            if now >= next_health:
                self._health_check()
                next_health = now + HEALTH_INTERVAL

    def _wait(self, timeout: float) -> bool:
        """Block until a notification arrives, the timeout passes or stop is asked (in short slices)."""
        conn = self._listen_conn
        assert conn is not None
        deadline = time.monotonic() + timeout
        while not self.stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with closing(conn.notifies(timeout=min(remaining, 0.25), stop_after=1)) as stream:
                got = next(stream, None)
            if got is not None:
                # Swallow the notifications already buffered: one drain serves them all. (Not from
                # inside the first generator: it holds the connection's lock until it is closed.)
                for _ in conn.notifies(timeout=0):
                    pass
                return True
        return False

    def _health_check(self) -> None:
        """A half-open TCP connection can look alive for hours: prove the LISTEN still holds."""
        conn = self._listen_conn
        assert conn is not None
        row = conn.execute(HEALTH_SQL).fetchone()
        if not row or row[0] != 1:
            raise psycopg.OperationalError("LISTEN registration missing")

    def drain(self) -> int:
        """Claim and forward until no pending row is left or the in-flight cap is reached."""
        conn = self._work_conn
        assert conn is not None
        total = 0
        while not self.stopping:
            running = jobs.count_running(conn)
            room = self.settings.max_in_flight - running
            if room <= 0 or (self._saturated and room < self._refill):
                # Saturated: claim again once a batch worth a round trip fits, not a job or two per tick.
                self._saturated = True
                self._saturated_wait = self._refill_wait(running, room)
                break
            if self._last_count is not None:
                self._note_pace(running)
            self._last_count = None
            want = min(self.settings.claim_batch, room)
            claims = jobs.claim_jobs(conn, want)
            self._saturated = False
            if not claims:
                break
            total += len(claims)
            if not self._forward(conn, claims):
                break
            if len(claims) < want:
                break  # the backlog is drained: the next claim waits for a notification or the poll
            if want == room:
                # The cap is reached: count again when the last refill's pace has freed the next one.
                self._saturated = True
                self._saturated_wait = self._wait_for(self._refill)
                self._last_count = (time.monotonic(), self.settings.max_in_flight)
                break
        if total:
            self.on_event("drained")
        return total

    def _refill_wait(self, running: int, room: int) -> float:
        """How long to wait before counting again at the cap: the time the pace since the last count
        needs to free a refill's worth, within [SATURATED_POLL, SATURATED_POLL_MAX].

        Each count is a scan of the running rows; a fixed 10 ms tick cost PostgreSQL a hundred of them
        a second for as long as the cap held, however slowly jobs finished. A refill that comes a
        little late costs nothing: the jobs already queued in Redis keep the workers busy meanwhile.
        """
        last = self._last_count
        if last is None:
            self._last_count = (time.monotonic(), running)
            return SATURATED_POLL
        if last[1] - running <= 0:  # nothing was claimed since that count, and nothing finished
            self._last_count = (time.monotonic(), running)
            return min(self._saturated_wait * 2, SATURATED_POLL_MAX)
        self._note_pace(running)
        return self._wait_for(self._refill - room)

    def _note_pace(self, running: int) -> None:
        """Slots freed per second since the last count at the cap; that count becomes this one."""
        now = time.monotonic()
        assert self._last_count is not None
        last, self._last_count = self._last_count, (now, running)
        freed = last[1] - running
        if freed > 0:
            self._pace = freed / max(now - last[0], 1e-3)

    def _wait_for(self, slots: int) -> float:
        """The time `slots` take to free at the last pace seen, within the bounds; the shortest if unknown.

        Carried across refills, so a steady backlog costs one count per claim, not a count right
        after each claim (when almost nothing has finished yet) and another once a refill fits.
        """
        if self._pace is None:
            return SATURATED_POLL
        return min(max(slots / self._pace, SATURATED_POLL), SATURATED_POLL_MAX)

    def _forward(self, conn: psycopg.Connection[Any], claims: list[jobs.Claim]) -> bool:
        """Send the batch to the generation queue in one round trip; on a broker failure put it back."""
        messages = [
            stage_message(GENERATE_ACTOR, GENERATE_QUEUE, str(claim.job_id), claim.attempt)
            for claim in claims
        ]
        try:
            self.broker.enqueue_many(messages)
        except Exception as exc:
            self.stats.forward_failures += len(claims)
            if self._metrics:
                self._metrics.forward_failures.inc(len(claims))
            log.warning(
                "forwarding to Dramatiq failed (%s): putting %d job(s) back", _first_line(exc), len(claims)
            )
            for claim in claims:
                jobs.release_claim(conn, claim.job_id, claim.attempt)
            return False
        for claim in claims:
            pickup = claim.pickup_seconds
            self.stats.claims += 1
            if self._metrics:
                self._metrics.claims.inc()
                self._metrics.pickup.observe(max(pickup, 0.0))
            transition("claimed", claim.job_id, claim.attempt, "queued", pickup_ms=round(pickup * 1000, 2))
        return True

    def rescue(self) -> list[jobs.Rescued]:
        """Expired leases back to pending (claimed again at once) or failed at the maximum attempts."""
        conn = self._work_conn
        assert conn is not None
        rescued = jobs.rescue_expired(
            conn, lease_seconds=self.settings.lease_seconds, max_attempts=self.settings.max_attempts
        )
        for item in rescued:
            outcome = "failed" if item.status == "failed" else "requeued"
            if outcome == "failed":
                self.stats.gave_up += 1
            else:
                self.stats.rescued += 1
            if self._metrics:
                self._metrics.rescues.labels(outcome).inc()
            transition("rescued", item.job_id, item.attempt, None, outcome=outcome)
        if any(item.status == "pending" for item in rescued):
            self.drain()
        return rescued

    def sweep(self) -> int:
        """Remove the images row and object of jobs that ended failed or cancelled since the last sweep."""
        from imagen.image_sweep import sweep_ended

        conn = self._work_conn
        assert conn is not None
        if self._storage is None:
            from imagen.errors import ImagenError
            from imagen.storage import open_storage

            try:
                self._storage = open_storage(self.settings)
            except ImagenError as exc:
                if str(exc) != self._storage_error:  # once, not every poll
                    log.warning(
                        "sweep: cannot open storage (%s); images of ended jobs stay until it can", exc
                    )
                    self._storage_error = str(exc)
                return 0
        swept = len(sweep_ended(conn, self._storage, limit=SWEEP_BATCH))
        self.stats.swept += swept
        if self._metrics and swept:
            self._metrics.swept.inc(swept)
        return swept


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def run_listener(settings: Settings) -> None:
    """`imagen listen`: run until SIGTERM or SIGINT, then exit cleanly."""
    import signal

    listener = Listener(settings)

    def _stop(signum: int, frame: object) -> None:
        log.info("listener: signal %s received, finishing the forward in hand", signum)
        listener.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    listener.run()
