"""The listener's loop on the in-memory store, a fake LISTEN connection and simulated time.

`World` is a small discrete-event simulation: its clock moves only when the listener waits
(on the notifier, or out a reconnect's backoff), and the events scheduled with `at` happen
at their time: jobs inserted with or without a notification, leases expiring, connections
lost, a stop. Every test runs in milliseconds, whatever the intervals it covers.
"""

from __future__ import annotations

import heapq
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from prometheus_client import CollectorRegistry

from imagen.config import load_settings
from imagen.errors import ConfigError, SchemaNotReady
from imagen.listener.gate import SATURATED_POLL_MAX
from imagen.listener.service import HEALTH_INTERVAL, Listener, run_listener
from imagen.store import InMemoryJobStore


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


OWNER = UUID("00000000-0000-4000-8000-000000000001")
REFUSED = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: Connection refused'


class Store(InMemoryJobStore):
    """The in-memory store, recording when the listener rescues and how often it closes its session."""

    closed = 0

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self.clock = clock
        self.rescues: list[float] = []

    def rescue_expired(self, *, lease_seconds: float, max_attempts: int, limit: int = 1000) -> list[Any]:
        self.rescues.append(round(self.clock(), 6))
        return super().rescue_expired(lease_seconds=lease_seconds, max_attempts=max_attempts, limit=limit)

    def close(self) -> None:
        self.closed += 1


class World:
    """Simulated time, the events in it, and the listener's edges: its sessions and its broker."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], object]]] = []
        self._scheduled = 0
        self._reads = 0
        self.store = Store(lambda: self.now)
        self.db_up = True
        self.refusal = ""  # what the server answers a connection, when it refuses it for good
        self.schema_missing = False
        self.notified = False
        self.notifiers: list[FakeNotifier] = []
        self.pauses: list[float] = []
        self.sent: list[tuple[float, str, int]] = []  # (time, job id, attempt) of each message
        self.broker_down = False
        self.seen: list[str] = []  # the listener's on_event calls
        self.listener: Listener | None = None
        self.on_forward: Callable[[], object] = lambda: None

    # time
    def clock(self) -> float:
        self._reads += 1
        if self._reads > 100_000:
            raise AssertionError(f"the loop spins at t={self.now} without waiting")
        return self.now

    def at(self, when: float, action: Callable[[], object]) -> None:
        self._scheduled += 1  # events at the same time happen in the order they were scheduled
        heapq.heappush(self._events, (when, self._scheduled, action))

    def advance(self, until: float, interrupted: Callable[[], bool]) -> None:
        """Happen every event due by `until`; stop early, at an event, once `interrupted()`."""
        while self._events and self._events[0][0] <= until:
            when, _, action = heapq.heappop(self._events)
            self.now = max(self.now, when)
            action()
            if interrupted():
                return
        self.now = max(self.now, until)

    # the database
    def insert(self, *, notify: bool = True) -> str:
        job_id = str(self.store.submit_job(OWNER, "p", {}))
        if notify and self.notifiers and not self.notifiers[-1].closed:
            self.notified = True
        return job_id

    def expire(self, job_id: str) -> None:
        """The job's worker stopped heartbeating long ago (a crash)."""
        self.store.jobs[UUID(job_id)]["heartbeat_at"] -= timedelta(seconds=601)

    def finish(self, job_id: str) -> None:
        self.store.jobs[UUID(job_id)]["status"] = "done"

    def open_notifier(self) -> FakeNotifier:
        if not self.db_up or self.refusal:
            raise psycopg.OperationalError(self.refusal or REFUSED)
        self.notified = False  # notifications sent while it was away are lost
        notifier = FakeNotifier(self)
        self.notifiers.append(notifier)
        return notifier

    def open_store(self) -> Store:
        if not self.db_up:
            raise psycopg.OperationalError(REFUSED)
        if self.schema_missing:
            raise SchemaNotReady("the database has no imagen schema")
        return self.store

    def lose_connection(self, problem: str = "server closed the connection unexpectedly") -> None:
        self.notifiers[-1].broken = problem

    def pause(self, seconds: float) -> None:
        """The backoff's wait: a stop ends it at once, as the stop event's wait does."""
        self.pauses.append(seconds)
        if len(self.pauses) > 1000:
            raise AssertionError(f"still reconnecting at t={self.now}")
        assert self.listener is not None
        listener = self.listener
        self.advance(self.now + seconds, lambda: listener.stopping)

    # the broker
    def enqueue_many(self, messages: list[Any]) -> list[Any]:
        if self.broker_down:
            raise ConnectionError("redis is down")
        assert {(m.queue_name, m.actor_name) for m in messages} == {("imagen-generate", "generate_stage")}
        self.sent += [(round(self.now, 6), m.args[0], m.args[1]) for m in messages]
        self.on_forward()
        return messages

    def sent_at(self, job_id: str) -> list[tuple[float, int]]:
        return [(when, attempt) for when, sent, attempt in self.sent if sent == job_id]


class FakeNotifier:
    """The LISTEN session: waits in simulated time; a notification or a lost connection ends a wait."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.broken = ""
        self.listening = True
        self.closed = False
        self.checks: list[float] = []
        self.waits: list[float] = []

    def wait(self, timeout: float) -> bool:
        assert not self.closed
        self.waits.append(timeout)
        world = self.world
        # A stop does not end this wait (a real one cannot be interrupted either); its caller
        # looks at the stop between waits.
        world.advance(world.now + timeout, lambda: world.notified or bool(self.broken))
        if self.broken:
            raise psycopg.OperationalError(self.broken)
        notified, world.notified = world.notified, False
        return notified

    def check(self) -> None:
        self.checks.append(round(self.world.now, 6))
        if not self.listening:
            raise psycopg.OperationalError("LISTEN registration missing")

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def world() -> World:
    return World()


def listener_in(world: World, tmp_path: Path, **overrides: Any) -> Listener:
    values: dict[str, Any] = {
        "poll_interval": 5.0, "lease_seconds": 600, "max_attempts": 3, "claim_batch": 100,
        "max_in_flight": 256, "listener_metrics_port": 0, "storage_dir": tmp_path / "storage",
    }  # fmt: skip
    values.update(overrides)
    metrics_port = values.pop("metrics_port", None)
    registry = values.pop("registry", None)
    listener = Listener(
        load_settings(**values),
        broker=world,
        metrics_port=metrics_port,
        on_event=world.seen.append,
        clock=world.clock,
        open_notifier=world.open_notifier,
        open_store=world.open_store,
        pause=world.pause,
        registry=registry,
    )
    world.listener = listener
    return listener


def run_until(world: World, listener: Listener, stop_at: float) -> None:
    world.at(stop_at, listener.stop)
    listener.run()


def listener_lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "imagen.listener" and r.levelno == level]


def test_a_notified_job_is_forwarded_at_once_and_the_log_shows_the_settings_and_each_mode(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.listener")
    listener = listener_in(
        world, tmp_path, poll_interval=2.5, lease_seconds=60, max_attempts=4, claim_batch=7
    )
    jobs: list[str] = []
    world.at(1.0, lambda: jobs.append(world.insert()))

    run_until(world, listener, 4.0)

    assert world.sent == [(1.0, jobs[0], 1)]
    assert world.seen == ["listening", "drained", "stopping"]
    assert listener_lines(caplog) == [
        "listener starting: poll every 2.5s, lease 60.0s, max attempts 4, batch 7, in-flight cap 256",
        "listener mode: listening",
        "listener mode: stopping",
        "listener stopped",
    ]
    assert (listener.stats.mode, listener.stats.claims) == ("stopping", 1)


def test_the_backlog_found_at_start_is_forwarded_before_the_first_wait(world: World, tmp_path: Path) -> None:
    jobs = [world.insert(notify=False) for _ in range(3)]
    listener = listener_in(world, tmp_path)

    run_until(world, listener, 1.0)

    assert world.sent == [(0.0, job_id, 1) for job_id in jobs]


def test_a_job_whose_notification_was_lost_waits_for_the_next_safety_poll(
    world: World, tmp_path: Path
) -> None:
    listener = listener_in(world, tmp_path, poll_interval=5.0)
    jobs: list[str] = []
    world.at(1.0, lambda: jobs.append(world.insert(notify=False)))
    world.at(6.0, lambda: jobs.append(world.insert(notify=False)))

    run_until(world, listener, 12.0)

    assert [(when, job_id) for when, job_id, _ in world.sent] == [(5.0, jobs[0]), (10.0, jobs[1])]
    assert world.store.rescues == [0.0, 5.0, 10.0], "one rescue at the start, then one per poll"


def test_an_expired_lease_is_rescued_at_the_next_poll_not_on_a_notification_and_forwarded_again_at_once(
    world: World, tmp_path: Path
) -> None:
    crashed = world.insert(notify=False)
    listener = listener_in(world, tmp_path, poll_interval=5.0)
    other: list[str] = []
    world.at(2.0, lambda: world.expire(crashed))
    world.at(3.0, lambda: other.append(world.insert()))

    run_until(world, listener, 7.0)

    assert world.sent_at(crashed) == [(0.0, 1), (5.0, 2)]
    assert world.sent_at(other[0]) == [(3.0, 1)]
    assert (listener.stats.rescued, listener.stats.gave_up) == (1, 0)


def test_a_rescue_that_only_fails_jobs_claims_nothing_more(world: World, tmp_path: Path) -> None:
    job_id = world.insert(notify=False)
    listener = listener_in(world, tmp_path, max_attempts=1)
    world.at(1.0, lambda: world.store.begin_stage(UUID(job_id), 1, "generating"))
    world.at(2.0, lambda: world.expire(job_id))

    run_until(world, listener, 6.0)

    assert world.sent_at(job_id) == [(0.0, 1)]
    assert world.store.job_state(UUID(job_id)) == ("failed", 1)
    assert listener.stats.gave_up == 1
    assert world.seen.count("drained") == 1


def test_the_listen_is_checked_every_ten_seconds_and_a_lost_one_reconnects(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.listener")
    listener = listener_in(world, tmp_path, poll_interval=4.0)
    jobs: list[str] = []

    def reset_by_a_pooler() -> None:
        world.notifiers[-1].listening = False
        jobs.append(world.insert(notify=False))  # its notification never comes: nobody listens

    world.at(9.0, lambda: jobs.append(world.insert(notify=False)))
    world.at(15.0, reset_by_a_pooler)

    run_until(world, listener, 31.0)

    first, second = world.notifiers
    assert HEALTH_INTERVAL == 10.0
    assert first.checks == [10.0, 20.0] and first.closed
    assert second.checks == [30.05]
    assert world.sent_at(jobs[0]) == [(12.0, 1)], "the health check at 10 s claims nothing: the poll does"
    assert world.sent_at(jobs[1]) == [(16.0, 1)], "claimed at the poll, before the check found the loss"
    assert listener.stats.reconnects == 1 and world.pauses == [0.05]
    assert listener_lines(caplog, logging.WARNING) == [
        "listener lost its database connection (LISTEN registration missing); reconnecting in 0.05s"
    ]


def test_a_dropped_connection_reconnects_and_claims_what_was_inserted_meanwhile(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.listener")
    listener = listener_in(world, tmp_path, poll_interval=5.0)
    jobs: list[str] = []

    def outage() -> None:
        world.lose_connection()
        world.db_up = False

    world.at(2.0, outage)
    world.at(2.01, lambda: jobs.append(world.insert()))  # its notification is lost
    world.at(2.1, lambda: setattr(world, "db_up", True))

    run_until(world, listener, 4.0)

    assert world.pauses == [0.05, 0.1]
    assert world.sent_at(jobs[0]) == [(2.15, 1)], "the catch-up drain after the LISTEN"
    assert listener.stats.reconnects == 2
    assert world.seen == ["listening", "reconnecting", "reconnecting", "listening", "drained", "stopping"]
    assert listener_lines(caplog, logging.WARNING) == [
        "listener lost its database connection (server closed the connection unexpectedly); reconnecting in 0.05s",
        f"listener lost its database connection ({REFUSED}); reconnecting in 0.10s",
    ]
    modes = [line for line in listener_lines(caplog) if line.startswith("listener mode")]
    assert modes == [f"listener mode: {m}" for m in ("listening", "reconnecting", "listening", "stopping")]


def test_reconnects_back_off_doubling_up_to_five_seconds_and_start_again_after_a_connection(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="imagen.listener")
    world.db_up = False
    listener = listener_in(world, tmp_path)
    world.at(30.0, lambda: setattr(world, "db_up", True))
    world.at(40.0, world.lose_connection)

    run_until(world, listener, 41.0)

    doubling = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
    assert world.pauses == pytest.approx([*doubling, 5.0, 5.0, 5.0, 5.0, 5.0, 0.05])
    assert listener.stats.reconnects == 13
    warnings = listener_lines(caplog, logging.WARNING)
    assert warnings[0] == f"listener cannot connect to the database ({REFUSED}); trying again in 0.05s"
    assert warnings[-1].endswith("reconnecting in 0.05s")


def test_a_wrong_password_is_a_configuration_error_not_a_reason_to_retry(
    world: World, tmp_path: Path
) -> None:
    world.refusal = 'connection failed: FATAL:  password authentication failed for user "x"'
    listener = listener_in(world, tmp_path)

    with pytest.raises(ConfigError, match=r"wrong credentials.*check IMAGEN_DATABASE_URL") as raised:
        listener.run()

    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert world.pauses == [] and listener.stats.reconnects == 0


def test_a_database_without_the_schema_stops_the_listener_and_closes_its_listen(
    world: World, tmp_path: Path
) -> None:
    world.schema_missing = True
    listener = listener_in(world, tmp_path)

    with pytest.raises(SchemaNotReady):
        listener.run()

    assert [n.closed for n in world.notifiers] == [True]
    assert world.pauses == []


def test_a_lost_connection_during_a_stop_ends_the_run_without_a_reconnect(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="imagen.listener")
    listener = listener_in(world, tmp_path)

    def stop_and_lose() -> None:
        listener.stop()
        world.lose_connection()

    world.at(3.0, stop_and_lose)

    listener.run()

    assert listener.stats.reconnects == 0 and world.pauses == []
    assert listener_lines(caplog, logging.WARNING) == []
    assert world.seen[-1] == "stopping"


def test_a_stop_while_idle_ends_the_run_within_a_quarter_second_and_closes_both_sessions(
    world: World, tmp_path: Path
) -> None:
    listener = listener_in(world, tmp_path, poll_interval=5.0)

    run_until(world, listener, 7.1)

    assert world.now == 7.25, "at the end of the quarter-second wait in hand"
    assert world.notifiers[0].closed and world.store.closed >= 1
    assert max(world.notifiers[0].waits) <= 0.25


def test_a_stop_during_the_backoff_ends_the_wait_at_once(world: World, tmp_path: Path) -> None:
    world.db_up = False
    listener = listener_in(world, tmp_path)

    run_until(world, listener, 0.12)

    assert world.now == pytest.approx(0.12) and world.pauses == [0.05, 0.1]
    assert world.seen[-1] == "stopping"


def test_a_notification_that_finds_nothing_to_claim_emits_no_drained_event(
    world: World, tmp_path: Path
) -> None:
    listener = listener_in(world, tmp_path)
    world.at(1.0, lambda: setattr(world, "notified", True))

    run_until(world, listener, 2.0)

    assert world.seen == ["listening", "stopping"]


def test_at_the_in_flight_cap_the_loop_counts_again_soon_not_at_the_next_poll(
    world: World, tmp_path: Path
) -> None:
    jobs = [world.insert(notify=False) for _ in range(10)]
    listener = listener_in(world, tmp_path, max_in_flight=8, poll_interval=30.0)
    world.at(1.0, lambda: world.finish(jobs[0]))

    run_until(world, listener, 3.0)

    assert [when for when, _, _ in world.sent[:8]] == [0.0] * 8
    ninth = world.sent[8][0]
    assert 1.0 < ninth <= 1.0 + SATURATED_POLL_MAX
    assert len(world.sent) == 9


def test_a_failed_forward_is_tried_again_at_the_next_poll(world: World, tmp_path: Path) -> None:
    listener = listener_in(world, tmp_path, poll_interval=5.0)
    jobs: list[str] = []

    def insert_while_redis_is_down() -> None:
        world.broker_down = True
        jobs.append(world.insert())

    world.at(1.0, insert_while_redis_is_down)
    world.at(2.0, lambda: setattr(world, "broker_down", False))

    run_until(world, listener, 6.0)

    assert world.sent_at(jobs[0]) == [(5.0, 1)]
    assert listener.stats.forward_failures == 1


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.usefixtures("restore_signals")
def test_sigterm_or_sigint_stops_imagen_listen_cleanly(
    world: World, tmp_path: Path, caplog: pytest.LogCaptureFixture, signum: int
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.listener")
    listener = listener_in(world, tmp_path)
    jobs: list[str] = []
    world.at(1.0, lambda: jobs.append(world.insert()))
    world.at(2.0, lambda: signal.raise_signal(signum))
    world.at(60.0, lambda: pytest.fail("the signal did not stop the listener"))

    run_listener(listener.settings, listener)

    assert world.sent_at(jobs[0]) == [(1.0, 1)]
    assert 2.0 <= world.now <= 2.25
    lines = listener_lines(caplog)
    assert f"listener: signal {int(signum)} received, finishing the forward in hand" in lines
    assert lines[-1] == "listener stopped"


@pytest.mark.parametrize("given", ["neither", "notifier", "store"])
def test_a_listener_without_a_database_url_refuses_to_start(world: World, tmp_path: Path, given: str) -> None:
    """Unless both its sessions are given, the listener opens one on IMAGEN_DATABASE_URL."""
    settings = load_settings(database_url="", storage_dir=tmp_path, listener_metrics_port=0)
    openers: dict[str, Any] = {
        "notifier": {"open_notifier": world.open_notifier},
        "store": {"open_store": world.open_store},
        "neither": {},
    }

    with pytest.raises(ConfigError, match="IMAGEN_DATABASE_URL is not set"):
        Listener(settings, broker=world, **openers[given])


@pytest.mark.usefixtures("restore_signals")
def test_imagen_listen_without_a_database_url_stops_with_a_configuration_error(tmp_path: Path) -> None:
    settings = load_settings(database_url="", storage_dir=tmp_path, listener_metrics_port=0)

    with pytest.raises(ConfigError, match="IMAGEN_DATABASE_URL is not set"):
        run_listener(settings)


def test_a_listener_given_no_broker_forwards_to_the_redis_imagen_redis_url_names(
    world: World, tmp_path: Path
) -> None:
    settings = load_settings(
        redis_url="redis://127.0.0.1:6399/3", storage_dir=tmp_path, listener_metrics_port=0
    )

    listener = Listener(settings, open_notifier=world.open_notifier, open_store=world.open_store)

    pool = listener.claimer.broker.client.connection_pool.connection_kwargs  # built, not connected
    assert (pool["host"], pool["port"], pool["db"]) == ("127.0.0.1", 6399, 3)


def test_a_stop_during_a_drain_finishes_the_batch_in_hand_and_claims_no_more(
    world: World, tmp_path: Path
) -> None:
    for _ in range(10):
        world.insert(notify=False)
    listener = listener_in(world, tmp_path, claim_batch=2)
    world.on_forward = listener.stop

    listener.run()

    assert len(world.sent) == 2
    assert world.store.count_running() == 2, "the other 8 stay pending for the next listener"


def test_at_the_cap_the_claimer_is_paced_on_the_listeners_clock(world: World, tmp_path: Path) -> None:
    for _ in range(100):
        world.insert(notify=False)
    listener = listener_in(world, tmp_path, max_in_flight=80)
    listener._connect()
    assert listener.drain() == 80
    for job_id in list(world.store.jobs)[:10]:
        world.finish(str(job_id))  # a refill's worth in 0.2 s of the listener's time
    world.now += 0.2

    assert listener.drain() == 10

    assert listener.gate.wait == pytest.approx(0.2), "50 a second: the next 10 take 0.2 s"


def test_drain_rescue_and_sweep_return_what_they_did(world: World, tmp_path: Path) -> None:
    jobs = [world.insert(notify=False) for _ in range(2)]
    listener = listener_in(world, tmp_path, max_attempts=1)
    listener._connect()

    assert listener.drain() == 2
    world.store.begin_stage(UUID(jobs[0]), 1, "generating")
    world.expire(jobs[0])
    world.expire(jobs[1])
    assert sorted((str(r.job_id), r.status) for r in listener.rescue()) == sorted(
        [(jobs[0], "failed"), (jobs[1], "pending")]
    )
    assert [when for when, job_id, _ in world.sent if job_id == jobs[1]] == [0.0, 0.0], (
        "claimed again at once"
    )
    assert listener.sweep() == 0, "a failed job without an image leaves nothing to sweep"


def test_the_metrics_show_the_listeners_mode_reconnects_and_claims_while_it_runs(
    world: World, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    listener = listener_in(
        world, tmp_path, metrics_port=free_port(), metrics_addr="127.0.0.1", registry=registry
    )
    seen: list[tuple[float, ...]] = []

    def look() -> None:
        value = registry.get_sample_value
        seen.append(
            (
                value("imagen_listener_mode", {"mode": "listening"}) or 0.0,
                value("imagen_listener_reconnects_total") or 0.0,
                value("imagen_listener_claims_total") or 0.0,
                value("imagen_listener_rescues_total", {"outcome": "requeued"}) or 0.0,
            )
        )

    crashed = world.insert(notify=False)
    world.at(1.0, lambda: world.expire(crashed))
    world.at(2.0, look)
    world.at(3.0, world.lose_connection)
    world.at(3.01, look)
    world.at(4.0, look)
    try:
        run_until(world, listener, 5.0)
    finally:
        assert listener.metrics is not None
        listener.metrics.close()

    assert world.sent_at(crashed) == [(0.0, 1), (3.05, 2)], "rescued by the catch-up after the reconnect"
    assert seen == [(1.0, 0.0, 1.0, 0.0), (0.0, 1.0, 1.0, 0.0), (1.0, 1.0, 2.0, 1.0)]
    assert registry.get_sample_value("imagen_listener_mode", {"mode": "stopping"}) == 1.0
