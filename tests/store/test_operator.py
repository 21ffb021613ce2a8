"""Cancel and retry, as the owner or operator asks, on every store."""

from __future__ import annotations

from uuid import UUID

import pytest

from imagen.store import JobStore

OWNER = UUID("00000000-0000-4000-8000-0000000000cc")


def test_cancel_takes_a_pending_job_and_it_is_never_claimed(store: JobStore) -> None:
    job_id = store.submit_job(OWNER, "p", {})

    assert store.cancel_job(job_id) is True

    assert store.job_state(job_id) == ("cancelled", 0)
    assert store.claim_jobs(10) == []


def test_cancel_of_a_running_job_stops_it_at_its_next_stage(store: JobStore) -> None:
    job_id = store.submit_job(OWNER, "p", {})
    store.claim_jobs(1)

    assert store.cancel_job(job_id) is True

    assert store.begin_stage(job_id, 1, "generating") is None
    row = store.get_job(job_id)
    assert row is not None and row["status"] == "cancelled" and row["finished_at"] is not None


@pytest.mark.parametrize("end", ["failed", "cancelled"])
def test_retry_puts_an_ended_job_back_to_pending_and_the_attempts_carry_on(store: JobStore, end: str) -> None:
    job_id = store.submit_job(OWNER, "p", {})
    store.claim_jobs(1)
    store.note_transient(job_id, 1, "generation: 503")
    if end == "failed":
        store.fail_job(job_id, 1, "generation failed: no")
    else:
        store.cancel_job(job_id)

    assert store.retry_job(job_id) is True
    assert store.retry_job(job_id) is False

    row = store.get_job(job_id)
    assert row is not None
    assert (row["status"], row["error"], row["last_error"], row["finished_at"]) == (
        "pending",
        None,
        None,
        None,
    )
    assert row["stage_times"] == {}
    assert [c.attempt for c in store.claim_jobs(1)] == [2]


def test_cancel_and_retry_leave_a_job_in_the_wrong_state_alone(store: JobStore) -> None:
    job_id = store.submit_job(OWNER, "p", {})

    assert store.retry_job(job_id) is False  # pending
    store.cancel_job(job_id)
    assert store.cancel_job(job_id) is False  # already cancelled

    assert store.job_state(job_id) == ("cancelled", 0)


def test_a_retried_jobs_claim_counts_its_pickup_from_the_retry(store: JobStore) -> None:
    job_id = store.submit_job(OWNER, "p", {})
    (first,) = store.claim_jobs(1)
    assert first.pending_since == first.created_at  # pending only since its INSERT
    store.fail_job(job_id, 1, "generation failed: no")
    assert store.retry_job(job_id) is True

    (again,) = store.claim_jobs(1)

    row = store.get_job(job_id)
    assert row is not None and row["pending_at"] is not None
    assert again.pending_since == row["pending_at"] >= first.claimed_at
    assert 0 <= again.pickup_seconds < again.claimed_at.timestamp() - again.created_at.timestamp() + 1e-9
