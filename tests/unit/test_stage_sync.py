"""The sync stage on the in-memory store: one upload at the job's path, one images row, what it sends.

What a user or operator notices: the object and its row (bucket, path, size, content type),
the finalize message on the finalize queue, the hand-off freed, a cancelled job never
uploaded, a lost hand-off regenerated, and the job's error text and log lines when it
cannot go on (docs/operations.md "Logs").
"""

from __future__ import annotations

import logging
from pathlib import Path
from uuid import UUID

import pytest
import redis

from imagen.broker import (
    FINALIZE_ACTOR,
    FINALIZE_QUEUE,
    GENERATE_ACTOR,
    GENERATE_QUEUE,
    SYNC_ACTOR,
    SYNC_QUEUE,
)
from imagen.errors import StorageError
from imagen.stages import run_generate, run_sync
from imagen.storage import StorageConfigError, job_object_path
from tests.stage_context import OWNER, Stages, Upload, claimed, job, logged, make_stages, transitions


@pytest.fixture
def stages(tmp_path: Path) -> Stages:
    return make_stages(tmp_path)


def generated(stages: Stages) -> str:
    """A claimed job whose generation ran: its image waits in the hand-off, its sync message is sent."""
    job_id = claimed(stages.store)
    run_generate(stages.ctx, job_id, 1)
    return job_id


def test_the_generation_hands_the_image_to_the_sync_queue_at_once(stages: Stages) -> None:
    job_id = generated(stages)

    assert stages.broker.messages == [(SYNC_ACTOR, SYNC_QUEUE, (job_id, 1), None)], "no delay queue hop"
    assert list(stages.handoff.entries) == [(job_id, 1)]


def test_sync_uploads_the_image_at_the_jobs_one_path_and_records_it_in_one_images_row(
    stages: Stages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="imagen.jobs")
    job_id = generated(stages)
    handed = stages.handoff.get(job_id, 1)
    assert handed is not None
    path = job_object_path(OWNER, UUID(job_id), "image/png")

    run_sync(stages.ctx, job_id, 1)

    assert stages.storage.uploads == [Upload(path, "image/png", len(handed.data))]
    assert stages.objects() == [stages.root / "imagen" / path]
    assert (stages.root / "imagen" / path).read_bytes() == handed.data
    (image,) = stages.store.images.values()
    assert (image["job_id"], image["owner_user_id"]) == (UUID(job_id), OWNER)
    assert (image["bucket"], image["path"], image["bytes"]) == ("imagen", path, len(handed.data))
    assert (image["mime"], image["width"], image["height"]) == ("image/png", 16, 16)
    assert stages.broker.messages[1:] == [
        (FINALIZE_ACTOR, FINALIZE_QUEUE, (job_id, 1, str(image["id"])), None)
    ]
    assert stages.handoff.entries == {}, "the hand-off is freed once the row is written"
    row = job(stages.store, job_id)
    assert (row["status"], row["stage"], row["image_id"]) == ("running", "finalizing", None)
    (synced,) = transitions(caplog, "synced")
    assert logged(synced) == {
        "event": "synced", "job_id": job_id, "attempt": 1, "stage": "syncing", "image_id": image["id"],
    }  # fmt: skip


def test_a_sync_retried_after_its_finalize_message_was_lost_uploads_once_and_goes_on_with_the_same_row(
    stages: Stages,
) -> None:
    job_id = generated(stages)
    stages.broker.fail_next.append(redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379."))

    with pytest.raises(redis.ConnectionError):
        run_sync(stages.ctx, job_id, 1)

    row = job(stages.store, job_id)
    assert row["status"] == "running"
    assert row["last_error"] == "sync: ConnectionError: Error 111 connecting to 127.0.0.1:6379."
    assert list(stages.handoff.entries) == [(job_id, 1)], "kept for the retry"

    run_sync(stages.ctx, job_id, 1)  # Dramatiq's retry: the row is there already

    (image,) = stages.store.images.values()
    assert len(stages.storage.uploads) == 1, "the retry does not upload again"
    assert stages.broker.messages[1:] == [
        (FINALIZE_ACTOR, FINALIZE_QUEUE, (job_id, 1, str(image["id"])), None)
    ]
    assert stages.handoff.entries == {}, "the retry frees the hand-off the first run kept"


def test_a_sync_for_a_job_cancelled_after_its_generation_uploads_nothing_and_frees_the_hand_off(
    stages: Stages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.jobs")
    job_id = generated(stages)
    assert stages.store.cancel_job(job_id)

    run_sync(stages.ctx, job_id, 1)

    assert stages.storage.uploads == [] and stages.objects() == [] and stages.store.images == {}
    assert stages.handoff.entries == {}, "the cancelled attempt's hand-off can never be used"
    assert [m[0] for m in stages.broker.messages] == [SYNC_ACTOR], "nothing sent on"
    assert job(stages.store, job_id)["status"] == "cancelled"
    (dropped,) = transitions(caplog, "dropped")
    assert logged(dropped) == {
        "event": "dropped", "job_id": job_id, "attempt": 1, "stage": "syncing",
        "reason": "job is cancelled at attempt 1",
    }  # fmt: skip


def test_a_sync_whose_hand_off_is_gone_sends_the_generation_again_at_the_same_attempt_and_says_why(
    stages: Stages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.jobs")
    job_id = generated(stages)
    stages.handoff.drop(job_id, 1)  # expired, or Redis lost it

    run_sync(stages.ctx, job_id, 1)

    assert stages.broker.messages[1:] == [(GENERATE_ACTOR, GENERATE_QUEUE, (job_id, 1), None)]
    assert stages.storage.uploads == [] and stages.store.images == {}
    assert job(stages.store, job_id)["status"] == "running"
    (again,) = transitions(caplog, "regenerating")
    assert logged(again) == {
        "event": "regenerating", "job_id": job_id, "attempt": 1, "stage": "syncing",
        "reason": "hand-off expired or lost",
    }  # fmt: skip


def test_a_sync_refused_by_storage_fails_the_job_with_the_storage_reason(stages: Stages) -> None:
    job_id = generated(stages)
    stages.storage.fail_put.append(StorageConfigError("bucket 'imagen' does not exist"))

    run_sync(stages.ctx, job_id, 1)

    row = job(stages.store, job_id)
    assert (row["status"], row["error"]) == ("failed", "sync failed: bucket 'imagen' does not exist")
    assert stages.store.images == {} and [m[0] for m in stages.broker.messages] == [SYNC_ACTOR]


def test_a_job_cancelled_during_its_upload_loses_the_object_and_the_drop_is_logged(
    stages: Stages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.jobs")
    job_id = generated(stages)
    stages.storage.during_put.append(lambda: stages.store.cancel_job(job_id))

    run_sync(stages.ctx, job_id, 1)

    assert stages.store.images == {} and stages.objects() == []
    assert [m[0] for m in stages.broker.messages] == [SYNC_ACTOR]
    (dropped,) = transitions(caplog, "dropped")
    assert logged(dropped) == {
        "event": "dropped", "job_id": job_id, "attempt": 1, "stage": "syncing",
        "reason": "job is cancelled at attempt 1",
    }  # fmt: skip


def test_an_ended_jobs_object_storage_cannot_remove_is_left_to_the_sweep_with_a_warning(
    stages: Stages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="imagen.stages")
    job_id = generated(stages)
    stages.storage.during_put.append(lambda: stages.store.cancel_job(job_id))
    stages.storage.fail_delete.append(StorageError("cannot remove the object: Permission denied"))

    run_sync(stages.ctx, job_id, 1)  # no error: the listener's sweep removes it later

    assert job(stages.store, job_id)["status"] == "cancelled"
    assert job(stages.store, job_id)["image_swept_at"] is None, "still on the sweep's list"
    warnings = [r.getMessage() for r in caplog.records if r.name == "imagen.stages"]
    assert warnings == [
        f"could not remove the image of ended job {job_id}: cannot remove the object: Permission denied;"
        " the sweep will"
    ]
