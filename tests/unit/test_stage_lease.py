"""The heartbeat thread and the stop check on the in-memory store, on a clock the test moves.

`Ticks` is the thread's clock and wait: each `step` lets the thread run one pass, so
a test sees every beat at the second it happens, in milliseconds of real time, and a
thread that stopped looping fails the step at once instead of hanging the test. The
same thread against PostgreSQL under real time is tests/integration/test_stage_attempts.py's.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from imagen import interrupts
from imagen.config import Settings
from imagen.stages.context import StageContext
from imagen.stages.lease import Beat, Heartbeater, heartbeating, own_limit, stop_check
from imagen.store import InMemoryJobStore
from tests.integration.conftest import RecordingBroker

OWNER = UUID("00000000-0000-4000-8000-00000000bbbb")
STEP_TIMEOUT_S = 5.0
START = 1000.0


class Ticks:
    """The heartbeat thread's clock and wait: the thread's wait returns when the test steps it."""

    def __init__(self) -> None:
        self.now = START
        self._go = threading.Semaphore(0)
        self._waiting = threading.Semaphore(0)

    def clock(self) -> float:
        return self.now

    def wait(self, seconds: float) -> None:
        entered = self.now
        self._waiting.release()
        self._go.acquire()
        self.now = max(self.now, entered + seconds)  # a sleep that began at `entered`

    def step(self, passes: int = 1) -> None:
        """Let the thread run `passes` passes; return once the last one has ended."""
        for _ in range(passes):
            assert self._waiting.acquire(timeout=STEP_TIMEOUT_S), (
                "the heartbeat thread waits for its next pass"
            )
            self._go.release()
        assert self._waiting.acquire(timeout=STEP_TIMEOUT_S), "the heartbeat thread ended its pass"
        self._waiting.release()  # it waits again: the next step's first pass may go


class FlakyStore(InMemoryJobStore):
    """A store whose connection drops for the next `failures` lease refreshes."""

    errors: tuple[type[BaseException], ...] = (ConnectionError,)

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    def heartbeat_many(self, keys: list[tuple[str, int]]) -> int:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("server closed the connection unexpectedly")
        return super().heartbeat_many(keys)


@pytest.fixture
def store() -> InMemoryJobStore:
    return InMemoryJobStore()


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


def claimed(store: InMemoryJobStore) -> str:
    job_id = store.submit_job(OWNER, "a lighthouse", {"backend": "mock"})
    (claim,) = store.claim_jobs(1)
    assert claim.job_id == job_id
    return str(job_id)


def heartbeat_at(store: InMemoryJobStore, job_id: str) -> Any:
    return store.jobs[UUID(job_id)]["heartbeat_at"]


def beat_times(store: InMemoryJobStore, ticks: Ticks, job_id: str, until: float) -> list[float]:
    """Step the thread until `until` seconds have passed; the seconds at which the job's lease was refreshed."""
    times = []
    last = heartbeat_at(store, job_id)
    while ticks.now < START + until:
        ticks.step()
        if heartbeat_at(store, job_id) != last:
            last = heartbeat_at(store, job_id)
            times.append(ticks.now - START)
    return times


@pytest.mark.parametrize(
    ("lease_seconds", "beats"),
    [
        (8, [2.0, 4.0, 6.0, 8.0]),  # a quarter of the lease
        (10, [3.0, 6.0, 9.0]),  # the first cancel check (every second) past a quarter
        (1, [0.5, 1.0, 1.5, 2.0]),  # never more often than every half second
        (600, [150.0, 300.0]),
    ],
)
def test_a_long_call_keeps_its_lease_fresh_every_quarter_lease(
    store: InMemoryJobStore, ticks: Ticks, lease_seconds: float, beats: list[float]
) -> None:
    heartbeater = Heartbeater(store, lease_seconds, clock=ticks.clock, wait=ticks.wait)
    job_id = claimed(store)

    with heartbeater.beating(job_id, 1, time_limit=1000) as beat:
        assert beat_times(store, ticks, job_id, until=beats[-1]) == beats
        assert not beat.gone


def test_a_call_past_its_stage_time_limit_gets_no_more_heartbeats(
    store: InMemoryJobStore, ticks: Ticks
) -> None:
    # A thread stuck past its limit must look dead to the lease rescue, which then takes the job back.
    heartbeater = Heartbeater(store, 8, clock=ticks.clock, wait=ticks.wait)
    job_id = claimed(store)

    with heartbeater.beating(job_id, 1, time_limit=4.5):
        assert beat_times(store, ticks, job_id, until=10) == [2.0, 4.0]


def test_a_call_ending_exactly_at_a_beat_gets_no_heartbeat_at_its_limit(
    store: InMemoryJobStore, ticks: Ticks
) -> None:
    heartbeater = Heartbeater(store, 8, clock=ticks.clock, wait=ticks.wait)
    job_id = claimed(store)

    with heartbeater.beating(job_id, 1, time_limit=4):
        assert beat_times(store, ticks, job_id, until=6) == [2.0]


def test_a_call_is_told_within_a_second_that_its_job_was_cancelled(
    store: InMemoryJobStore, ticks: Ticks
) -> None:
    heartbeater = Heartbeater(store, 600, clock=ticks.clock, wait=ticks.wait)
    cancelled, kept = claimed(store), claimed(store)

    with heartbeater.beating(cancelled, 1, 360) as gone, heartbeater.beating(kept, 1, 360) as running:
        ticks.step(3)
        assert not gone.gone and not running.gone
        assert store.cancel_job(cancelled)
        ticks.step()
        assert gone.gone, "the cancelled job's call gives up within CANCEL_CHECK_S"
        assert not running.gone, "the other job's call goes on"


def test_a_call_that_lost_its_job_to_a_newer_attempt_gets_no_more_heartbeats(
    store: InMemoryJobStore, ticks: Ticks
) -> None:
    heartbeater = Heartbeater(store, 8, clock=ticks.clock, wait=ticks.wait)
    stale, live = claimed(store), claimed(store)
    store.jobs[UUID(stale)]["heartbeat_at"] -= timedelta(seconds=700)
    assert store.rescue_expired(lease_seconds=600, max_attempts=3)
    (claim,) = store.claim_jobs(1)
    assert claim.attempt == 2
    before = heartbeat_at(store, stale)

    with heartbeater.beating(stale, 1, 360) as old, heartbeater.beating(live, 1, 360):
        ticks.step()
        assert old.gone, "told at the first check"
        assert beat_times(store, ticks, live, until=4) == [2.0, 4.0]

    assert heartbeat_at(store, stale) == before, "attempt 2's lease is attempt 2's to keep"


def test_a_call_younger_than_a_check_interval_is_not_looked_up(store: InMemoryJobStore, ticks: Ticks) -> None:
    # One statement per interval for the calls that outlast it; the mock's millisecond calls cost none.
    heartbeater = Heartbeater(store, 8, clock=ticks.clock, wait=ticks.wait)
    first, second = claimed(store), claimed(store)
    looked_up: list[list[tuple[str, int]]] = []
    still_running = store.still_running

    def looking_up(keys: list[tuple[str, int]]) -> set[tuple[str, int]]:
        looked_up.append(sorted(keys))
        return still_running(keys)

    store.still_running = looking_up  # type: ignore[method-assign]

    with heartbeater.beating(first, 1, 360):
        ticks.step()
        ticks.now += 0.5
        with heartbeater.beating(second, 1, 360):
            ticks.step()

    assert looked_up == [[(first, 1)], [(first, 1)]]


def test_a_job_held_by_two_blocks_keeps_its_lease_until_the_last_ends(
    store: InMemoryJobStore, ticks: Ticks
) -> None:
    heartbeater = Heartbeater(store, 8, clock=ticks.clock, wait=ticks.wait)
    job_id = claimed(store)

    with heartbeater.beating(job_id, 1, 360) as outer:
        with heartbeater.beating(job_id, 1, 360) as inner:
            assert inner is outer, "one entry per job and attempt"
        assert beat_times(store, ticks, job_id, until=2) == [2.0]
    assert beat_times(store, ticks, job_id, until=6) == []
    assert heartbeater.active == {}


def test_one_heartbeat_thread_serves_every_call_of_the_process(store: InMemoryJobStore, ticks: Ticks) -> None:
    heartbeater = Heartbeater(store, 8, clock=ticks.clock, wait=ticks.wait)
    first, second = claimed(store), claimed(store)

    before = heartbeat_at(store, first)

    with heartbeater.beating(first, 1, 360):
        thread = heartbeater.thread
        with heartbeater.beating(second, 1, 360):
            assert heartbeater.thread is thread
            assert beat_times(store, ticks, second, until=2) == [2.0]
    assert heartbeat_at(store, first) > before
    assert thread is not None and thread.name == "imagen-heartbeat" and thread.daemon, (
        "no thread holds up an exit"
    )


def test_a_failed_heartbeat_is_logged_and_the_next_interval_tries_again(
    ticks: Ticks, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore()
    heartbeater = Heartbeater(store, 8, clock=ticks.clock, wait=ticks.wait)
    job_id = claimed(store)
    store.failures = 1

    with caplog.at_level(logging.WARNING, logger="imagen.stages.lease"), heartbeater.beating(job_id, 1, 360):
        assert beat_times(store, ticks, job_id, until=4) == [4.0]

    assert [r.getMessage() for r in caplog.records if r.name == "imagen.stages.lease"] == [
        "heartbeat for 1 job(s) failed; will retry: server closed the connection unexpectedly"
    ]


def make_ctx(store: InMemoryJobStore, tmp_path: Path, clock: Any = None, **settings: Any) -> StageContext:
    values = {
        "storage": "local",
        "storage_dir": tmp_path / "storage",
        "output_dir": tmp_path / "out",
        **settings,
    }
    extra = {"clock": clock} if clock is not None else {}
    return StageContext(Settings(_env_file=None, **values), RecordingBroker(), store=store, **extra)  # type: ignore[call-arg]


def test_heartbeating_keeps_the_lease_with_the_contexts_heartbeat_thread(
    store: InMemoryJobStore, ticks: Ticks, tmp_path: Path
) -> None:
    ctx = make_ctx(store, tmp_path)
    ctx.heartbeater = Heartbeater(store, 8, clock=ticks.clock, wait=ticks.wait)
    job_id = claimed(store)

    with heartbeating(ctx, job_id, 1, 3) as beat:
        assert (beat.started, beat.deadline) == (START, START + 3)
        assert beat_times(store, ticks, job_id, until=4) == [2.0]


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


def test_a_wait_gives_up_at_the_stage_time_limit_with_the_limit_named(
    store: InMemoryJobStore, tmp_path: Path
) -> None:
    clock = Clock()
    ctx = make_ctx(store, tmp_path, clock, generate_time_limit=90, provider_timeout=60)
    check = stop_check(ctx, Beat(count=1, started=START, deadline=START + 88))

    clock.now = START + 87.9
    assert check() is None
    clock.now = START + 88
    stopped = check()
    assert isinstance(stopped, interrupts.CallAbandoned) and stopped.is_transient
    assert str(stopped) == "stopped at the stage's time limit (90 s, IMAGEN_GENERATE_TIME_LIMIT)"


def test_a_wait_gives_up_when_its_job_is_gone(store: InMemoryJobStore, tmp_path: Path) -> None:
    ctx = make_ctx(store, tmp_path, Clock())
    beat = Beat(count=1, started=START, deadline=START + 100)
    check = stop_check(ctx, beat)

    assert check() is None
    beat.gone = True
    stopped = check()
    assert isinstance(stopped, interrupts.JobGone) and not stopped.is_transient
    assert str(stopped) == "the job was cancelled or taken over while its call ran"


def test_a_wait_gives_up_once_the_worker_has_stopped_and_its_grace_has_passed(
    store: InMemoryJobStore, tmp_path: Path
) -> None:
    clock = Clock()
    ctx = make_ctx(store, tmp_path, clock, shutdown_grace=5)
    beat = Beat(count=1, started=START, deadline=START + 100)
    beat.gone = True  # the stop is the reason given first: the job is retried
    check = stop_check(ctx, beat)
    ctx.stop()

    clock.now = START + 4.9
    assert isinstance(check(), interrupts.JobGone)
    clock.now = START + 5
    stopped = check()
    assert isinstance(stopped, interrupts.CallAbandoned)
    assert str(stopped) == "the worker stopped (SIGTERM) before the call ended; the job will be retried"


def test_a_worker_stop_gives_waits_the_shutdown_grace(store: InMemoryJobStore, tmp_path: Path) -> None:
    beat = Beat(count=1, started=START, deadline=float("inf"))
    graceful = make_ctx(store, tmp_path, shutdown_grace=60)
    graceful.stop()
    assert stop_check(graceful, beat)() is None, "a minute's grace left"

    at_once = make_ctx(store, tmp_path, shutdown_grace=0)
    at_once.stop()
    assert isinstance(stop_check(at_once, beat)(), interrupts.CallAbandoned)


@pytest.mark.parametrize(("limit", "ours"), [(360, 358), (5, 3), (3, 1.5), (1, 0.5)])
def test_the_stage_gives_up_before_dramatiqs_time_limit_so_the_error_is_ours(
    limit: float, ours: float
) -> None:
    assert own_limit(limit) == ours
