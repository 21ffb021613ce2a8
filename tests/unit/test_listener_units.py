"""The listener's claimer and rescuer on the in-memory store: their logic without a server."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest

from imagen.config import load_settings
from imagen.listener.claimer import Claimer
from imagen.listener.gate import InFlightGate
from imagen.listener.metrics import ListenerStats
from imagen.listener.rescuer import Rescuer
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
