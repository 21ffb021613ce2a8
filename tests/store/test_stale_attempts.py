"""A rescued attempt's late writes against the attempt that replaced it, and writes after a cancel.

The real sequence behind most of the fences: attempt 1 stalls past its lease, the
rescuer puts the job back, the listener claims it as attempt 2, and attempt 1's
message then wakes up and writes. Each test here is the one that fails when that
write's attempt or status check is left out of its statement (issue 21's
mutants), on PostgreSQL where the SQL decides and on the in-memory store.
"""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from imagen.store import ImageRow, JobStore
from imagen.usage import UsageRecord
from tests.store.conftest import Harness

OWNER = UUID("00000000-0000-4000-8000-0000000000ee")
LEASE = 600.0


def image_row(job_id: UUID) -> ImageRow:
    return ImageRow(
        job_id=job_id, bucket="imagen", path=f"{OWNER}/{job_id}.png", mime="image/png", width=64,
        height=64, bytes=100, prompt="a lighthouse", backend="mock", model="mock-1", params={"seed": 1},
    )  # fmt: skip


def taken_over(store: JobStore, harness: Harness, *, before_rescue: object = None) -> UUID:
    """A job attempt 1 held until its lease expired, now running as attempt 2."""
    job_id = store.submit_job(OWNER, "a lighthouse", {"backend": "mock"})
    (claim,) = store.claim_jobs(1)
    assert (claim.job_id, claim.attempt) == (job_id, 1)
    assert store.begin_stage(job_id, 1, "generating") is not None
    if callable(before_rescue):
        before_rescue(job_id)
    harness.age_heartbeat(job_id, LEASE + 1)
    assert [r.status for r in store.rescue_expired(lease_seconds=LEASE, max_attempts=5)] == ["pending"]
    (again,) = store.claim_jobs(1)
    assert (again.job_id, again.attempt) == (job_id, 2)
    return job_id


def test_a_rescued_attempt_cannot_fail_the_job_its_successor_now_runs(
    store: JobStore, harness: Harness
) -> None:
    job_id = taken_over(store, harness)

    assert store.fail_job(job_id, 1, "generation failed: the old attempt's error") is False

    row = store.get_job(job_id)
    assert row is not None
    assert (row["status"], row["attempt"], row["error"]) == ("running", 2, None)


def test_a_rescued_attempt_cannot_complete_the_job_its_successor_now_runs(
    store: JobStore, harness: Harness
) -> None:
    job_id = taken_over(store, harness)

    assert store.complete_job(job_id, 1, uuid4()) is False

    row = store.get_job(job_id)
    assert row is not None
    assert (row["status"], row["attempt"], row["image_id"]) == ("running", 2, None)


def test_a_rescued_attempts_heartbeat_does_not_keep_its_successors_lease_alive(
    store: JobStore, harness: Harness
) -> None:
    job_id = taken_over(store, harness)
    harness.age_heartbeat(job_id, LEASE + 1)  # attempt 2 stalled too

    assert store.heartbeat_many([(str(job_id), 1)]) == 0

    (rescued,) = store.rescue_expired(lease_seconds=LEASE, max_attempts=5)
    assert (rescued.job_id, rescued.status, rescued.attempt) == (job_id, "pending", 2)


def test_a_heartbeat_of_a_cancelled_job_neither_counts_nor_revives_it(store: JobStore) -> None:
    job_id = store.submit_job(OWNER, "p", {"backend": "mock"})
    store.claim_jobs(1)
    assert store.cancel_job(job_id)

    assert store.heartbeat_many([(str(job_id), 1)]) == 0

    assert store.job_state(job_id) == ("cancelled", 1)


def test_an_upload_after_a_cancel_never_starts(store: JobStore) -> None:
    # The sync stage's first write: a cancel that came while the image was generated must stop it
    # before the upload, at the same attempt (the attempt check alone cannot see a cancel).
    job_id = store.submit_job(OWNER, "p", {"backend": "mock"})
    store.claim_jobs(1)
    assert store.begin_stage(job_id, 1, "generating") is not None
    assert store.cancel_job(job_id)

    assert store.begin_sync(job_id, 1) == (None, None)

    row = store.get_job(job_id)
    assert row is not None
    assert row["status"] == "cancelled" and row["stage"] != "syncing"
    assert "syncing" not in row["stage_times"]


def usage(job_id: UUID) -> UsageRecord:
    return UsageRecord(
        backend="mock", model="mock-1", images=1, ok=True, latency_ms=2.0, owner_user_id=OWNER,
        job_id=job_id, call_id=uuid4(),
    )  # fmt: skip


@pytest.mark.parametrize("path", ["separate stages", "chained", "chained with usage"])
def test_a_newer_attempt_reuses_the_images_row_an_earlier_attempt_wrote(
    store: JobStore, harness: Harness, path: str
) -> None:
    # Attempt 1 wrote the row, then stalled before finishing; attempt 2 generates again and must
    # end linked to that one row, not be turned away as if it had lost the job.
    first: list[UUID | None] = []
    job_id = taken_over(
        store, harness, before_rescue=lambda j: first.append(store.record_job_image(1, image_row(j)))
    )
    assert first[0] is not None

    if path == "separate stages":
        again = store.record_job_image(2, image_row(job_id))
        assert again is not None and store.complete_job(job_id, 2, again)
    elif path == "chained":
        again = store.record_job_image(2, image_row(job_id), complete_after=0.1)
    else:
        again = store.record_job_image(2, image_row(job_id), complete_after=0.1, usage=usage(job_id))

    assert again == first[0]
    assert [r["id"] for r in harness.images(job_id)] == [first[0]]
    row = store.get_job(job_id)
    assert row is not None and (row["status"], row["attempt"], row["image_id"]) == ("done", 2, first[0])
