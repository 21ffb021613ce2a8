"""Heartbeat and rescue: the lease, the same on every store."""

from __future__ import annotations

from uuid import UUID

from imagen.store import JobStore
from tests.store.conftest import Harness

OWNER = UUID("00000000-0000-4000-8000-0000000000bb")
LEASE = 600.0


def claimed(store: JobStore) -> UUID:
    job_id = store.submit_job(OWNER, "p", {"backend": "mock"})
    (claim,) = store.claim_jobs(1)
    return claim.job_id if claim.job_id == job_id else job_id


def test_a_job_within_its_lease_is_not_rescued(store: JobStore, harness: Harness) -> None:
    job_id = claimed(store)
    harness.age_heartbeat(job_id, LEASE - 60)

    assert store.rescue_expired(lease_seconds=LEASE, max_attempts=3) == []
    assert store.job_state(job_id) == ("running", 1)


def test_a_heartbeat_renews_the_lease_so_the_rescuer_leaves_the_job(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)
    store.begin_stage(job_id, 1, "generating")
    harness.age_heartbeat(job_id, LEASE + 60)

    assert store.heartbeat_many([(str(job_id), 1), (str(job_id), 7)]) == 1

    assert store.rescue_expired(lease_seconds=LEASE, max_attempts=3) == []
    assert store.job_state(job_id) == ("running", 1)


def test_an_expired_lease_below_the_maximum_goes_back_to_pending_and_is_claimed_as_the_next_attempt(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)
    store.begin_stage(job_id, 1, "generating")
    harness.age_heartbeat(job_id, LEASE + 1)

    (rescued,) = store.rescue_expired(lease_seconds=LEASE, max_attempts=3)

    assert (rescued.job_id, rescued.status, rescued.attempt) == (job_id, "pending", 1)
    row = store.get_job(job_id)
    assert row is not None and (row["stage"], row["heartbeat_at"]) == (None, None)
    assert [c.attempt for c in store.claim_jobs(1)] == [2]
    assert store.begin_stage(job_id, 1, "syncing") is None  # the old attempt's message is dropped


def test_an_expired_lease_at_the_maximum_fails_the_job_with_text_a_person_can_act_on(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)
    store.begin_stage(job_id, 1, "generating")
    store.note_transient(job_id, 1, "generation: provider 503")
    harness.age_heartbeat(job_id, LEASE + 1)

    (rescued,) = store.rescue_expired(lease_seconds=LEASE, max_attempts=1)

    assert (rescued.status, rescued.attempt) == ("failed", 1)
    row = store.get_job(job_id)
    assert row is not None and row["status"] == "failed"
    assert row["error"] == (
        "gave up after 1 attempts: the job stopped making progress in stage generating "
        "(no heartbeat for 600 s); last error: generation: provider 503"
    )


def test_a_job_still_queued_always_goes_back_to_pending_whatever_its_attempt(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)
    harness.age_heartbeat(job_id, LEASE + 1)

    (rescued,) = store.rescue_expired(lease_seconds=LEASE, max_attempts=1)

    assert (rescued.status, store.job_state(job_id)) == ("pending", ("pending", 1))


def test_rescue_takes_the_oldest_leases_first_up_to_its_limit(store: JobStore, harness: Harness) -> None:
    first = claimed(store)
    second = claimed(store)
    harness.age_heartbeat(first, LEASE + 100)
    harness.age_heartbeat(second, LEASE + 200)

    rescued = store.rescue_expired(lease_seconds=LEASE, max_attempts=3, limit=1)

    assert [r.job_id for r in rescued] == [second]
    assert store.job_state(first) == ("running", 1)


def test_a_job_given_up_without_an_error_says_only_why_and_the_lease_as_set(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)
    store.begin_stage(job_id, 1, "syncing")
    harness.age_heartbeat(job_id, 10)

    assert [r.status for r in store.rescue_expired(lease_seconds=2.5, max_attempts=1)] == ["failed"]

    row = store.get_job(job_id)
    assert row is not None and row["error"] == (
        "gave up after 1 attempts: the job stopped making progress in stage syncing (no heartbeat for 2.5 s)"
    )


def test_the_next_attempt_starts_without_the_last_attempts_transient_error(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)
    store.note_transient(job_id, 1, "generation: provider 503")
    harness.age_heartbeat(job_id, LEASE + 1)
    store.rescue_expired(lease_seconds=LEASE, max_attempts=3)

    (claim,) = store.claim_jobs(1)

    row = store.get_job(job_id)
    assert row is not None and (claim.attempt, row["last_error"], row["error"]) == (2, None, None)
