"""The listener's claimer and rescuer on the in-memory store: their logic without a server."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from imagen.config import load_settings
from imagen.listener.claimer import Claimer
from imagen.listener.gate import SATURATED_POLL, InFlightGate
from imagen.listener.metrics import ListenerStats
from imagen.listener.rescuer import Rescuer
from imagen.storage import LocalStorage, job_object_path
from imagen.store import InMemoryJobStore

OWNERS = [UUID(f"00000000-0000-4000-8000-00000000000{i}") for i in range(1, 4)]


class Broker:
    def __init__(self, *, down: bool = False) -> None:
        self.down = down
        self.sent: list[tuple[str, int]] = []

    def enqueue_many(self, messages: list[Any]) -> list[Any]:
        if self.down:
            raise ConnectionError("redis is down")
        self.sent += [(m.args[0], m.args[1]) for m in messages]
        return messages


def claimer(broker: Broker, *, cap: int = 256, batch: int = 100) -> Claimer:
    return Claimer(broker, InFlightGate(cap, batch), ListenerStats(), None)


def test_the_claimer_forwards_a_fair_backlog_in_claim_order_as_first_attempts() -> None:
    store = InMemoryJobStore()
    jobs = {owner: [store.submit_job(owner, "p", {}) for _ in range(2)] for owner in OWNERS}
    broker = Broker()

    assert claimer(broker).drain(store, lambda: False) == 6

    expected = [str(jobs[o][i]) for i in range(2) for o in OWNERS]
    assert broker.sent == [(job_id, 1) for job_id in expected]


def test_the_claimer_stops_at_the_in_flight_cap_and_leaves_the_rest_pending() -> None:
    store = InMemoryJobStore()
    for _ in range(50):
        store.submit_job(OWNERS[0], "p", {})
    broker = Broker()

    assert claimer(broker, cap=16, batch=100).drain(store, lambda: False) == 16

    assert store.count_running() == 16 and len(broker.sent) == 16


class CountingStore(InMemoryJobStore):
    """Counts the store calls a drain makes (each is a round trip on PostgreSQL)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def count_running(self) -> int:
        self.calls.append("count")
        return super().count_running()

    def claim_jobs(self, limit: int, *, max_owners: int = 1000) -> list[Any]:
        self.calls.append("claim")
        return super().claim_jobs(limit, max_owners=max_owners)

    def claim_within_cap(self, limit: int, max_in_flight: int) -> tuple[list[Any], int | None]:
        self.calls.append("claim")
        with self._lock:  # one step, as one statement: not the two calls above
            running = InMemoryJobStore.count_running(self)
            claims = InMemoryJobStore.claim_jobs(self, max(0, min(limit, max_in_flight - running)))
        return claims, (running if claims else None)


def test_an_idle_wake_up_claims_in_one_round_trip_with_the_count_inside() -> None:
    store = CountingStore()
    store.submit_job(OWNERS[0], "p", {})
    broker = Broker()

    assert claimer(broker).drain(store, lambda: False) == 1

    assert store.calls == ["claim"], "no separate count before the claim"
    assert len(broker.sent) == 1


def test_at_the_cap_the_claimer_still_counts_before_claiming() -> None:
    store = CountingStore()
    for _ in range(20):
        store.submit_job(OWNERS[0], "p", {})
    unit = claimer(Broker(), cap=8, batch=100)

    assert unit.drain(store, lambda: False) == 8
    store.calls.clear()
    assert unit.drain(store, lambda: False) == 0, "the cap holds"

    assert store.calls == ["count"]


def test_a_failed_forward_puts_the_batch_back_without_counting_the_attempt() -> None:
    store = InMemoryJobStore()
    job_id = store.submit_job(OWNERS[0], "p", {})
    unit = claimer(Broker(down=True))

    assert unit.drain(store, lambda: False) == 1

    assert store.job_state(job_id) == ("pending", 0)
    assert unit.stats.forward_failures == 1 and unit.stats.claims == 0


def test_a_stopping_listener_claims_nothing() -> None:
    store = InMemoryJobStore()
    store.submit_job(OWNERS[0], "p", {})

    assert claimer(Broker()).drain(store, lambda: True) == 0
    assert store.count_running() == 0


@pytest.mark.parametrize(("max_attempts", "outcome"), [(3, "pending"), (1, "failed")])
def test_the_rescuer_counts_requeued_and_failed_leases(max_attempts: int, outcome: str) -> None:
    store = InMemoryJobStore()
    job_id = store.submit_job(OWNERS[0], "p", {})
    store.claim_jobs(1)
    store.begin_stage(job_id, 1, "generating")
    store.jobs[job_id]["heartbeat_at"] -= timedelta(seconds=601)
    stats = ListenerStats()
    settings = load_settings(lease_seconds=600, max_attempts=max_attempts)

    (rescued,) = Rescuer(settings, stats, None).rescue(store)

    assert rescued.status == outcome
    assert (stats.rescued, stats.gave_up) == ((1, 0) if outcome == "pending" else (0, 1))


class RecordedMetrics:
    """The listener's Prometheus counters, by the same names and labels, in a registry of their own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.claims = Counter("imagen_listener_claims", "", registry=self.registry)
        self.forward_failures = Counter("imagen_listener_forward_failures", "", registry=self.registry)
        self.rescues = Counter("imagen_listener_rescues", "", ["outcome"], registry=self.registry)
        self.swept = Counter("imagen_listener_swept_images", "", registry=self.registry)
        self.pickup = Histogram("imagen_listener_pickup_seconds", "", registry=self.registry)

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


def test_the_rescuer_counts_each_rescue_in_its_metric_by_outcome() -> None:
    store = InMemoryJobStore()
    for _ in range(3):
        store.submit_job(OWNERS[0], "p", {})
    claims = store.claim_jobs(3)
    for claim in claims:
        store.begin_stage(claim.job_id, 1, "generating")
        store.jobs[claim.job_id]["heartbeat_at"] -= timedelta(seconds=601)
    store.jobs[claims[0].job_id]["attempt"] = 3  # at the maximum: this one gives up
    metrics = RecordedMetrics()
    settings = load_settings(lease_seconds=600, max_attempts=3)

    stats = ListenerStats()

    Rescuer(settings, stats, metrics).rescue(store)  # type: ignore[arg-type]

    assert metrics.value("imagen_listener_rescues_total", outcome="requeued") == 2
    assert metrics.value("imagen_listener_rescues_total", outcome="failed") == 1
    assert (stats.rescued, stats.gave_up) == (2, 1)


def test_the_claimer_counts_claims_pickup_and_failed_forwards_in_its_metrics() -> None:
    store = InMemoryJobStore()
    for _ in range(2):
        store.submit_job(OWNERS[0], "p", {})
    metrics = RecordedMetrics()
    ok = Claimer(Broker(), InFlightGate(256, 100), ListenerStats(), metrics)  # type: ignore[arg-type]
    assert ok.drain(store, lambda: False) == 2
    store.submit_job(OWNERS[1], "p", {})
    down = Claimer(Broker(down=True), InFlightGate(256, 100), ListenerStats(), metrics)  # type: ignore[arg-type]
    assert down.drain(store, lambda: False) == 1

    assert metrics.value("imagen_listener_claims_total") == 2
    assert metrics.value("imagen_listener_pickup_seconds_count") == 2
    assert metrics.value("imagen_listener_forward_failures_total") == 1


def transitions(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "imagen.jobs" and getattr(r, "event", None) == event]


def test_each_claim_is_logged_with_its_job_attempt_and_pickup_and_counted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = InMemoryJobStore()
    jobs = [store.submit_job(OWNERS[0], "p", {}) for _ in range(3)]
    metrics = RecordedMetrics()
    unit = Claimer(Broker(), InFlightGate(256, 2), ListenerStats(), metrics)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="imagen.jobs")

    assert unit.drain(store, lambda: False) == 3  # two batches: 2, then 1

    logged = transitions(caplog, "claimed")
    assert [(r.job_id, r.attempt, r.stage) for r in logged] == [(str(j), 1, "queued") for j in jobs]
    assert all(0 <= r.pickup_ms < 60_000 for r in logged)
    assert unit.stats.claims == 3
    assert 0 <= metrics.value("imagen_listener_pickup_seconds_sum") < 60


def test_a_failed_forward_is_logged_with_the_brokers_error_and_counted_per_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = InMemoryJobStore()
    for _ in range(3):
        store.submit_job(OWNERS[0], "p", {})
    metrics = RecordedMetrics()
    unit = Claimer(Broker(down=True), InFlightGate(256, 2), ListenerStats(), metrics)  # type: ignore[arg-type]
    caplog.set_level(logging.WARNING, logger="imagen.listener")

    assert unit.drain(store, lambda: False) == 2  # the first batch fails: the drain stops there
    assert unit.drain(store, lambda: False) == 2

    assert unit.stats.forward_failures == 4 and metrics.value("imagen_listener_forward_failures_total") == 4
    warnings = [r.getMessage() for r in caplog.records if r.name == "imagen.listener"]
    assert warnings == ["forwarding to Dramatiq failed (redis is down): putting 2 job(s) back"] * 2
    assert store.count_running() == 0


def test_each_rescue_is_logged_with_its_job_attempt_and_outcome_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = InMemoryJobStore()
    stats = ListenerStats()
    settings = load_settings(lease_seconds=600, max_attempts=2)
    rescuer = Rescuer(settings, stats, None)
    caplog.set_level(logging.INFO, logger="imagen.jobs")
    job_id = store.submit_job(OWNERS[0], "p", {})
    outcomes = []
    for attempt in (1, 2):  # rescued twice: requeued, then given up at the maximum
        store.claim_jobs(1)
        store.begin_stage(job_id, attempt, "generating")
        store.jobs[job_id]["heartbeat_at"] -= timedelta(seconds=601)
        outcomes += [r.status for r in rescuer.rescue(store)]

    assert outcomes == ["pending", "failed"]
    logged = transitions(caplog, "rescued")
    assert [(r.job_id, r.attempt, r.stage, r.outcome) for r in logged] == [
        (str(job_id), 1, None, "requeued"),
        (str(job_id), 2, None, "failed"),
    ]
    assert (stats.rescued, stats.gave_up) == (1, 1)


def test_a_drain_counts_once_per_claim_and_returns_its_total_at_the_cap_and_on_an_empty_backlog() -> None:
    store = InMemoryJobStore()
    for _ in range(20):
        store.submit_job(OWNERS[0], "p", {})
    counts = [0]
    count_running = store.count_running

    def counting() -> int:
        counts[0] += 1
        return count_running()

    store.count_running = counting  # type: ignore[method-assign]
    clock = [100.0]
    unit = Claimer(Broker(), InFlightGate(16, 100), ListenerStats(), None, clock=lambda: clock[0])

    assert unit.drain(store, lambda: False) == 16
    assert counts[0] == 1, "a claim that fills the cap stops without counting again"
    clock[0] += 1.0
    assert unit.drain(store, lambda: False) == 0, "at the cap: nothing, and a number"
    store.jobs[next(iter(store.jobs))]["status"] = "done"  # one finishes: too few for a refill
    clock[0] += 1.0
    assert unit.drain(store, lambda: False) == 0
    assert unit.gate.saturated and unit.gate.wait > 0
    empty = Claimer(Broker(), InFlightGate(16, 100), ListenerStats(), None)
    assert empty.drain(InMemoryJobStore(), lambda: False) == 0


@pytest.mark.parametrize(
    ("error", "shown"),
    [(ConnectionError(), "ConnectionError"), (ConnectionError("refused\nat line 2"), "refused")],
)
def test_a_failed_forward_shows_the_first_line_of_the_error_or_its_type(
    caplog: pytest.LogCaptureFixture, error: Exception, shown: str
) -> None:
    class Failing(Broker):
        def enqueue_many(self, messages: list[Any]) -> list[Any]:
            raise error

    store = InMemoryJobStore()
    store.submit_job(OWNERS[0], "p", {})
    caplog.set_level(logging.WARNING, logger="imagen.listener")

    Claimer(Failing(), InFlightGate(16, 100), ListenerStats(), None).drain(store, lambda: False)

    (message,) = [r.getMessage() for r in caplog.records if r.name == "imagen.listener"]
    assert message == f"forwarding to Dramatiq failed ({shown}): putting 1 job(s) back"


def test_the_gate_at_exactly_the_cap_waits_and_one_slot_below_it_claims_one() -> None:
    gate = InFlightGate(max_in_flight=20, claim_batch=100)
    assert (gate.refill, gate.wait, gate.saturated) == (2, SATURATED_POLL, False)

    assert gate.want(19, 0.0) == 1
    assert gate.filled(1, 0.0) is True and gate.saturated
    assert gate.want(20, 0.1) == 0 and gate.saturated

    fresh = InFlightGate(max_in_flight=256, claim_batch=100)
    assert fresh.want(0, 0.0) == 100
    assert fresh.filled(100, 0.0) is False and not fresh.saturated


def test_at_the_cap_the_refill_freed_since_the_cap_filled_is_claimed_and_the_next_count_paced() -> None:
    store = InMemoryJobStore()
    for _ in range(100):
        store.submit_job(OWNERS[0], "p", {})
    broker = Broker()
    clock = [100.0]
    unit = Claimer(broker, InFlightGate(80, 100), ListenerStats(), None, clock=lambda: clock[0])
    assert unit.drain(store, lambda: False) == 80, "up to the cap"
    for claim in list(store.jobs.values())[:10]:
        claim["status"] = "done"  # a refill's worth (an eighth of the cap) finishes in 0.2 s
    clock[0] += 0.2

    assert unit.drain(store, lambda: False) == 10

    assert len(broker.sent) == 90 and store.count_running() == 80
    assert unit.gate.saturated and unit.gate.wait == pytest.approx(0.2), "50 a second: the next 10 in 0.2 s"


def test_a_cap_filled_by_another_listener_is_claimed_into_once_a_refill_is_free() -> None:
    store = InMemoryJobStore()
    for _ in range(30):
        store.submit_job(OWNERS[0], "p", {})
    others = store.claim_jobs(16)  # another listener's
    broker = Broker()
    clock = [100.0]
    unit = Claimer(broker, InFlightGate(16, 100), ListenerStats(), None, clock=lambda: clock[0])
    assert unit.drain(store, lambda: False) == 0
    for claim in others[:2]:
        store.jobs[claim.job_id]["status"] = "done"
    clock[0] += 0.1

    assert unit.drain(store, lambda: False) == 2

    assert len(broker.sent) == 2 and store.count_running() == 16


def test_a_drain_cut_short_by_another_listener_filling_the_cap_returns_what_it_forwarded() -> None:
    class Shared(InMemoryJobStore):
        """Another listener claims the rest of the room between this one's batches."""

        batches = 0

        def claim_within_cap(self, limit: int, max_in_flight: int) -> tuple[list[Any], int | None]:
            self.batches += 1
            if self.batches == 2:
                self.claim_jobs(max_in_flight - self.count_running())
            return super().claim_within_cap(limit, max_in_flight)

    store = Shared()
    for _ in range(50):
        store.submit_job(OWNERS[0], "p", {})
    broker = Broker()

    assert claimer(broker, cap=32, batch=10).drain(store, lambda: False) == 10

    assert len(broker.sent) == 10 and store.count_running() == 32


class FrozenStore(InMemoryJobStore):
    """The in-memory store on a clock the test sets: pickup times come out exact."""

    time = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.time


def test_each_claims_pickup_is_observed_in_seconds_and_logged_in_milliseconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FrozenStore()
    job_id = store.submit_job(OWNERS[0], "p", {})
    store.time += timedelta(seconds=0.234567)
    metrics = RecordedMetrics()
    caplog.set_level(logging.INFO, logger="imagen.jobs")

    Claimer(Broker(), InFlightGate(16, 100), ListenerStats(), metrics).drain(store, lambda: False)  # type: ignore[arg-type]

    assert metrics.value("imagen_listener_pickup_seconds_sum") == pytest.approx(0.234567)
    (logged,) = transitions(caplog, "claimed")
    assert (logged.job_id, logged.pickup_ms) == (str(job_id), 234.57)


def test_every_lease_given_up_is_counted() -> None:
    store = InMemoryJobStore()
    for _ in range(2):
        job_id = store.submit_job(OWNERS[0], "p", {})
        store.claim_jobs(1)
        store.begin_stage(job_id, 1, "generating")
        store.jobs[job_id]["heartbeat_at"] -= timedelta(seconds=601)
    stats = ListenerStats()

    Rescuer(load_settings(lease_seconds=600, max_attempts=1), stats, None).rescue(store)

    assert (stats.rescued, stats.gave_up) == (0, 2)


def ended_job_with_its_object(store: InMemoryJobStore, storage: LocalStorage) -> UUID:
    job_id = store.submit_job(OWNERS[0], "p", {})
    store.claim_jobs(1)
    storage.put(job_object_path(OWNERS[0], job_id, "image/png"), b"png", "image/png")
    store.fail_job(job_id, 1, "sync failed: storage down")
    return job_id


def test_the_sweep_removes_the_objects_of_failed_jobs_and_counts_them(tmp_path: Path) -> None:
    settings = load_settings(storage_dir=tmp_path / "storage")
    storage = LocalStorage(settings.storage_dir, settings.bucket)
    store = InMemoryJobStore()
    jobs = [ended_job_with_its_object(store, storage) for _ in range(2)]
    stats, metrics = ListenerStats(), RecordedMetrics()
    rescuer = Rescuer(settings, stats, metrics)  # type: ignore[arg-type]

    assert rescuer.sweep(store) == 2
    assert rescuer.sweep(store) == 0, "each once"

    assert not any(storage.local_path(job_object_path(OWNERS[0], j, "image/png")).exists() for j in jobs)
    assert stats.swept == 2 and metrics.value("imagen_listener_swept_images_total") == 2
    third = ended_job_with_its_object(store, storage)
    assert rescuer.sweep(store) == 1 and stats.swept == 3
    assert not storage.local_path(job_object_path(OWNERS[0], third, "image/png")).exists()


def test_a_sweep_visits_at_most_a_hundred_ended_jobs_per_poll(tmp_path: Path) -> None:
    settings = load_settings(storage_dir=tmp_path / "storage")
    storage = LocalStorage(settings.storage_dir, settings.bucket)
    store = InMemoryJobStore()
    for _ in range(101):
        ended_job_with_its_object(store, storage)

    rescuer = Rescuer(settings, ListenerStats(), None)

    assert [rescuer.sweep(store), rescuer.sweep(store)] == [100, 1]


def test_storage_that_cannot_open_is_reported_once_and_tried_again_at_each_sweep(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="imagen.listener")
    broken = load_settings(storage_dir=tmp_path / "storage", supabase_url="", storage="supabase")
    store = InMemoryJobStore()
    rescuer = Rescuer(broken, ListenerStats(), None)

    assert [rescuer.sweep(store), rescuer.sweep(store)] == [0, 0]

    (warning,) = [r.getMessage() for r in caplog.records if r.name == "imagen.listener"]
    assert warning == (
        "sweep: cannot open storage (IMAGEN_STORAGE=supabase needs SUPABASE_URL and "
        "SUPABASE_SERVICE_ROLE_KEY); images of ended jobs stay until it can"
    )
    fixed = load_settings(storage_dir=tmp_path / "storage")
    rescuer.settings = fixed
    ended_job_with_its_object(store, LocalStorage(fixed.storage_dir, fixed.bucket))
    assert rescuer.sweep(store) == 1
