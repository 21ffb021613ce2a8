"""The images row and usage rows under the job's fence, and the discard of an ended job's image."""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from imagen.storage import LocalStorage
from imagen.store import ImageRow, JobStore
from imagen.usage import UsageRecord
from tests.store.conftest import Harness

OWNER = UUID("00000000-0000-4000-8000-0000000000dd")
OTHER = UUID("00000000-0000-4000-8000-0000000000de")


def claimed(store: JobStore) -> UUID:
    job_id = store.submit_job(OWNER, "a lighthouse", {"backend": "mock"})
    (claim,) = store.claim_jobs(1)
    assert claim.job_id == job_id
    return job_id


def image_row(job_id: UUID) -> ImageRow:
    return ImageRow(
        job_id=job_id, bucket="imagen", path=f"{OWNER}/{job_id}.png", mime="image/png", width=64, height=48,
        bytes=123, prompt="a lighthouse", backend="mock", model="mock-1", params={"seed": 7},
    )  # fmt: skip


def usage(job_id: UUID, call_id: UUID | None = None) -> UsageRecord:
    return UsageRecord(
        backend="mock", model="mock-1", images=1, ok=True, latency_ms=2.0, owner_user_id=OWNER,
        job_id=job_id, call_id=call_id or uuid4(),
    )  # fmt: skip


def test_a_job_gets_one_images_row_owned_by_its_owner_however_often_it_is_recorded(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)

    first = store.record_job_image(1, image_row(job_id))
    again = store.record_job_image(1, image_row(job_id))

    assert first is not None and again == first
    (row,) = harness.images(job_id)
    assert (row["id"], row["owner_user_id"], row["path"], row["width"], row["height"]) == (
        first, OWNER, f"{OWNER}/{job_id}.png", 64, 48,
    )  # fmt: skip
    job = store.get_job(job_id)
    assert job is not None and job["stage"] == "finalizing" and job["status"] == "running"


def test_a_sync_that_runs_again_learns_the_image_is_already_recorded(store: JobStore) -> None:
    job_id = claimed(store)
    job, existing = store.begin_sync(job_id, 1)
    assert job is not None and existing is None
    image_id = store.record_job_image(1, image_row(job_id))

    job, existing = store.begin_sync(job_id, 1)

    assert job is not None and existing == image_id


def test_the_chained_record_writes_the_row_and_ends_the_job_done_in_one_step(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)
    store.begin_stage(job_id, 1, "generating")
    call = usage(job_id)

    image_id = store.record_job_image(1, image_row(job_id), complete_after=0.25, usage=call)

    job = store.get_job(job_id)
    assert job is not None and image_id is not None
    assert (job["status"], job["image_id"], job["stage"]) == ("done", image_id, None)
    assert {"syncing", "done"} <= set(job["stage_times"])
    assert [r["id"] for r in harness.images(job_id)] == [image_id]
    assert harness.usage_call_ids() == [call.call_id]


def test_the_chained_record_writes_the_usage_row_even_when_the_job_moved_on(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)
    store.cancel_job(job_id)
    call = usage(job_id)

    assert store.record_job_image(1, image_row(job_id), complete_after=0.1, usage=call) is None

    assert harness.images(job_id) == []
    assert harness.usage_call_ids() == [call.call_id]
    assert store.job_state(job_id) == ("cancelled", 1)


def test_the_chained_record_without_a_usage_ends_the_job_done_and_writes_no_usage_row(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)

    image_id = store.record_job_image(1, image_row(job_id), complete_after=0.1)

    job = store.get_job(job_id)
    assert job is not None and image_id is not None
    assert (job["status"], job["image_id"]) == ("done", image_id)
    assert harness.usage_call_ids() == []


def test_a_usage_row_written_twice_with_one_call_id_is_one_row(store: JobStore, harness: Harness) -> None:
    job_id = claimed(store)
    call = usage(job_id)

    store.record_usage(call)
    store.record_usage(call)
    store.record_usage(usage(job_id))

    assert call.call_id in harness.usage_call_ids() and len(harness.usage_call_ids()) == 2


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects", "imagen")


def test_discarding_a_cancelled_job_removes_its_images_row_and_object(
    store: JobStore, harness: Harness, storage: LocalStorage
) -> None:
    job_id = claimed(store)
    path = f"{OWNER}/{job_id}.png"
    storage.put(path, b"png", "image/png")
    store.record_job_image(1, image_row(job_id))
    store.cancel_job(job_id)

    discarded = store.discard_ended(job_id, storage)

    assert discarded is not None
    assert (discarded.status, discarded.row, discarded.objects) == ("cancelled", True, [path])
    assert harness.images(job_id) == []
    assert not storage.local_path(path).exists()
    again = store.discard_ended(job_id, storage)
    assert again is not None and not again.removed_anything


@pytest.mark.parametrize("state", ["running", "done", "pending"])
def test_discard_leaves_a_job_that_is_not_failed_or_cancelled_alone(
    store: JobStore, harness: Harness, storage: LocalStorage, state: str
) -> None:
    job_id = claimed(store)
    path = f"{OWNER}/{job_id}.png"
    storage.put(path, b"png", "image/png")
    image_id = store.record_job_image(1, image_row(job_id))
    assert image_id is not None
    if state == "done":
        store.complete_job(job_id, 1, image_id)
    elif state == "pending":
        store.fail_job(job_id, 1, "x")
        store.retry_job(job_id)

    assert store.discard_ended(job_id, storage) is None

    assert len(harness.images(job_id)) == 1
    assert storage.local_path(path).exists()


def test_the_sweep_discards_the_images_of_ended_jobs_once_and_leaves_done_ones(
    store: JobStore, harness: Harness, storage: LocalStorage
) -> None:
    ended, done = claimed(store), claimed(store)
    for job_id in (ended, done):
        storage.put(f"{OWNER}/{job_id}.png", b"png", "image/png")
    store.record_job_image(1, image_row(ended))
    done_image = store.record_job_image(1, image_row(done))
    assert done_image is not None
    store.complete_job(done, 1, done_image)
    store.fail_job(ended, 1, "sync failed: no")

    swept = store.sweep_ended(storage)

    assert [d.job_id for d in swept] == [ended]
    assert harness.images(ended) == [] and len(harness.images(done)) == 1
    assert store.sweep_ended(storage) == []


class FailingStorage(LocalStorage):
    """Local storage whose deletes of one path fail, as a storage outage does."""

    failing: str = ""

    def delete(self, path: str) -> bool:
        if path == self.failing:
            from imagen.errors import TransientStorageError

            raise TransientStorageError("storage is down")
        return super().delete(path)


def test_the_sweep_takes_the_oldest_ended_first_and_a_storage_error_leaves_only_that_job_for_later(
    store: JobStore, harness: Harness, tmp_path: Path
) -> None:
    storage = FailingStorage(tmp_path / "objects", "imagen")
    first, second, third = claimed(store), claimed(store), claimed(store)
    for job_id in (first, second, third):
        storage.put(f"{OWNER}/{job_id}.png", b"png", "image/png")
        store.record_job_image(1, image_row(job_id))
    for job_id in (second, first, third):  # ended in this order
        store.fail_job(job_id, 1, "sync failed: no")
    storage.failing = f"{OWNER}/{first}.png"

    assert [d.job_id for d in store.sweep_ended(storage, limit=1)] == [second]
    assert [d.job_id for d in store.sweep_ended(storage, limit=10)] == [third]  # first's storage failed

    assert len(harness.images(first)) == 1, "its row stays while its object could not be removed"
    storage.failing = ""
    assert [d.job_id for d in store.sweep_ended(storage)] == [first]
    assert harness.images(first) == [] and not storage.local_path(f"{OWNER}/{first}.png").exists()


def test_a_usage_row_keeps_every_field_of_its_record_written_alone_or_with_the_chained_record(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)
    alone = UsageRecord(
        backend="mock", model="mock-1", images=2, ok=False, latency_ms=1234.5, cost_usd=0.125,
        cost_basis="per image", input_tokens=10, output_tokens=20, image_output_tokens=30,
        thought_tokens=40, error="503 from the provider", owner_user_id=OWNER, job_id=job_id,
        raw={"usage": {"total": 70}},
    )  # fmt: skip
    chained = dataclasses.replace(alone, ok=True, error=None, raw={"id": "call-2"}, call_id=uuid4())

    store.record_usage(alone)
    store.record_job_image(1, image_row(job_id), complete_after=0.0, usage=chained)

    for record in (alone, chained):
        row = harness.usage_row(record.call_id)
        numbers = ("latency_ms", "cost_usd")  # PostgreSQL's numerics come back as Decimal
        assert {k: float(v) if k in numbers else v for k, v in row.items()} == dataclasses.asdict(record)


def test_the_sync_stage_gets_the_jobs_own_fields_under_the_fence(store: JobStore) -> None:
    job_id = store.submit_job(OWNER, "a lighthouse", {"backend": "mock", "n": 2})
    store.claim_jobs(1)
    row = store.get_job(job_id)
    assert row is not None

    generating = store.begin_stage(job_id, 1, "generating")
    syncing, _ = store.begin_sync(job_id, 1)

    for job in (generating, syncing):
        assert job is not None
        assert (job.job_id, job.owner_user_id, job.prompt, job.attempt) == (job_id, OWNER, "a lighthouse", 1)
        assert json.loads(job.params_json) == {"backend": "mock", "n": 2}
        assert (job.created_at, job.claimed_at) == (row["created_at"], row["claimed_at"])


def test_a_sync_never_takes_the_image_of_another_job_of_the_same_owner(store: JobStore) -> None:
    first, second = claimed(store), claimed(store)
    assert store.record_job_image(1, image_row(first)) is not None

    job, existing = store.begin_sync(second, 1)

    assert job is not None and existing is None


def test_an_images_row_of_another_owner_for_the_job_is_never_returned_or_linked(
    store: JobStore, harness: Harness
) -> None:
    job_id = claimed(store)
    store.insert_image(image_row(job_id), OTHER)  # a CLI run wrote a row naming this job, as another owner

    assert store.begin_sync(job_id, 1)[1] is None
    assert store.record_job_image(1, image_row(job_id)) is None
    assert store.record_job_image(1, image_row(job_id), complete_after=0.0) is None
    assert [r["owner_user_id"] for r in harness.images(job_id)] == [OTHER]
    assert store.job_state(job_id) == ("running", 1)


def test_an_image_without_a_job_is_never_written_under_a_fence(store: JobStore) -> None:
    claimed(store)
    orphan = dataclasses.replace(image_row(uuid4()), job_id=None)

    assert store.record_job_image(1, orphan) is None


@pytest.mark.parametrize(("upload", "stamped"), [(30.0, 30.0), (-5.0, 0.0)])
def test_the_chained_record_stamps_syncing_the_upload_time_before_done(
    store: JobStore, upload: float, stamped: float
) -> None:
    job_id = claimed(store)

    assert store.record_job_image(1, image_row(job_id), complete_after=upload) is not None

    job = store.get_job(job_id)
    assert job is not None
    times = {k: datetime.fromisoformat(v) if isinstance(v, str) else v for k, v in job["stage_times"].items()}
    assert (times["done"] - times["syncing"]).total_seconds() == pytest.approx(stamped, abs=0.001)


def test_discard_removes_the_object_at_every_path_the_jobs_image_can_have(
    store: JobStore, storage: LocalStorage
) -> None:
    job_id = claimed(store)
    paths = [f"{OWNER}/{job_id}.png", f"{OWNER}/{job_id}.webp"]  # two attempts, two image types
    for path in paths:
        storage.put(path, b"image", "image/png")
    store.record_job_image(1, image_row(job_id))
    store.cancel_job(job_id)

    discarded = store.discard_ended(job_id, storage)

    assert discarded is not None and (discarded.row, discarded.objects) == (True, paths)
    assert not any(storage.local_path(p).exists() for p in paths)


def test_discard_keeps_an_object_another_images_row_still_names(
    store: JobStore, harness: Harness, storage: LocalStorage
) -> None:
    job_id = claimed(store)
    png, webp = f"{OWNER}/{job_id}.png", f"{OWNER}/{job_id}.webp"
    storage.put(png, b"image", "image/png")
    storage.put(webp, b"image", "image/webp")
    # A detached image at the job's path: a pruned job's, whose id came back (paths_in_use).
    store.insert_image(dataclasses.replace(image_row(job_id), job_id=None), OWNER)
    store.fail_job(job_id, 1, "generation failed: no")

    discarded = store.discard_ended(job_id, storage)

    assert discarded is not None and (discarded.row, discarded.objects) == (False, [webp])
    assert storage.local_path(png).exists()


def test_the_sweep_reports_only_the_jobs_it_removed_something_of(
    store: JobStore, storage: LocalStorage
) -> None:
    nothing = claimed(store)
    store.fail_job(nothing, 1, "generation failed: no")  # it never wrote an image or an object
    something = claimed(store)
    storage.put(f"{OWNER}/{something}.png", b"png", "image/png")
    store.cancel_job(something)

    swept = store.sweep_ended(storage)

    assert [(d.job_id, d.status, d.attempt, d.row) for d in swept] == [(something, "cancelled", 1, False)]
    assert store.sweep_ended(storage) == []


def test_the_sweep_logs_what_it_removed_and_the_job_it_must_try_again(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from imagen.store import PostgresJobStore

    store = PostgresJobStore.from_url(db_url)
    storage = FailingStorage(tmp_path / "objects", "imagen")
    cleaned, stuck = claimed(store), claimed(store)
    for job_id in (cleaned, stuck):
        storage.put(f"{OWNER}/{job_id}.png", b"png", "image/png")
        store.record_job_image(1, image_row(job_id))
        store.fail_job(job_id, 1, "sync failed: no")
    storage.failing = f"{OWNER}/{stuck}.png"

    with caplog.at_level(logging.INFO):
        store.sweep_ended(storage)

    (swept,) = [r for r in caplog.records if getattr(r, "event", None) == "swept"]
    assert (swept.job_id, swept.attempt, swept.status, swept.images_row, swept.objects) == (  # type: ignore[attr-defined]
        str(cleaned), 1, "failed", True, 1,
    )  # fmt: skip
    assert (
        swept.getMessage() == f"job {cleaned} attempt=1 stage=- swept status=failed images_row=True objects=1"
    )
    (warning,) = [r for r in caplog.records if r.name == "imagen.store.postgres_stages"]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == (
        f"sweep: could not remove the image of job {stuck}: storage is down; will try again"
    )
