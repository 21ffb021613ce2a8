"""Stage writes are fenced on (status running, attempt), on every store."""

from __future__ import annotations

import json
from uuid import UUID, uuid4

import pytest

from imagen.store import ImageRow, JobStore
from tests.store.conftest import Harness

OWNER = UUID("00000000-0000-4000-8000-0000000000aa")


def claimed(store: JobStore, params: dict[str, object] | None = None) -> UUID:
    job_id = store.submit_job(OWNER, "a lighthouse", params or {"backend": "mock", "size": "64x64"})
    (claim,) = store.claim_jobs(1)
    assert claim.job_id == job_id
    return job_id


def image_row(job_id: UUID, path: str | None = None) -> ImageRow:
    return ImageRow(
        job_id=job_id, bucket="imagen", path=path or f"{OWNER}/{job_id}.png", mime="image/png", width=64,
        height=64, bytes=100, prompt="a lighthouse", backend="mock", model="mock-1", params={"seed": 1},
    )  # fmt: skip


def test_begin_stage_returns_the_job_and_stamps_its_stage(store: JobStore) -> None:
    job_id = claimed(store, {"backend": "mock", "n": 1})

    job = store.begin_stage(job_id, 1, "generating")

    assert job is not None
    assert (job.job_id, job.owner_user_id, job.prompt, job.attempt) == (job_id, OWNER, "a lighthouse", 1)
    assert json.loads(job.params_json) == {"backend": "mock", "n": 1}
    row = store.get_job(job_id)
    assert row is not None and row["stage"] == "generating"
    assert list(row["stage_times"]) == ["queued", "generating"]


def test_every_stage_write_of_a_stale_attempt_changes_nothing(store: JobStore, harness: Harness) -> None:
    job_id = claimed(store)
    before = store.get_job(job_id)

    assert store.begin_stage(job_id, 2, "generating") is None
    assert store.begin_sync(job_id, 2) == (None, None)
    assert store.heartbeat_many([(str(job_id), 2)]) == 0
    assert store.note_transient(job_id, 2, "boom") is False
    assert store.fail_job(job_id, 2, "boom") is False
    assert store.complete_job(job_id, 2, uuid4()) is False
    assert store.record_job_image(2, image_row(job_id)) is None
    assert store.record_job_image(2, image_row(job_id), complete_after=0.1) is None

    assert store.get_job(job_id) == before
    assert harness.images(job_id) == []


@pytest.mark.parametrize("ended", ["cancel", "fail", "done"])
def test_a_job_no_longer_running_drops_its_attempts_stage_writes(store: JobStore, ended: str) -> None:
    job_id = claimed(store)
    if ended == "cancel":
        assert store.cancel_job(job_id)
    elif ended == "fail":
        assert store.fail_job(job_id, 1, "generation failed: no")
    else:
        image_id = store.record_job_image(1, image_row(job_id))
        assert image_id is not None and store.complete_job(job_id, 1, image_id)
    status = store.job_state(job_id)

    assert store.begin_stage(job_id, 1, "syncing") is None
    assert store.note_transient(job_id, 1, "late") is False
    assert store.record_job_image(1, image_row(job_id)) is None

    assert store.job_state(job_id) == status


def test_fail_ends_the_job_with_its_error(store: JobStore) -> None:
    job_id = claimed(store)
    store.note_transient(job_id, 1, "generation: timeout")

    assert store.fail_job(job_id, 1, "generation failed: refused") is True

    row = store.get_job(job_id)
    assert row is not None
    assert (row["status"], row["stage"], row["error"]) == ("failed", None, "generation failed: refused")
    assert row["last_error"] == "generation: timeout"
    assert row["finished_at"] is not None


def test_complete_marks_done_links_the_image_and_clears_errors(store: JobStore) -> None:
    job_id = claimed(store)
    store.note_transient(job_id, 1, "sync: 503")
    image_id = store.record_job_image(1, image_row(job_id))
    assert image_id is not None

    assert store.complete_job(job_id, 1, image_id) is True
    assert store.complete_job(job_id, 1, image_id) is False

    row = store.get_job(job_id)
    assert row is not None
    assert (row["status"], row["image_id"], row["stage"], row["last_error"]) == ("done", image_id, None, None)
    assert "done" in row["stage_times"]


def test_note_transient_keeps_the_latest_error_bounded(store: JobStore) -> None:
    job_id = claimed(store)

    assert store.note_transient(job_id, 1, "x" * 5000) is True

    row = store.get_job(job_id)
    assert row is not None and row["last_error"] == "x" * 2000 and row["status"] == "running"
