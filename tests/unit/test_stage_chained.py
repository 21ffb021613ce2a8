"""The chained stages (IMAGEN_CHAIN_STAGES) on the in-memory store: generate, sync and finish in one message.

What a user or operator notices: the job done with one object and one images row from
its generation message, its stage times, its provider call recorded once whatever
happens, a failing upload handed to the sync stage instead of calling the provider
again, and the job's lease kept fresh during a slow upload but not past its time limit.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from imagen.broker import FINALIZE_ACTOR, FINALIZE_QUEUE, SYNC_ACTOR, SYNC_QUEUE
from imagen.errors import TransientError, TransientStorageError
from imagen.stages import run_finalize, run_generate, run_sync
from imagen.stages.chained import sync_chained
from imagen.stages.lease import heartbeating
from imagen.storage import StorageConfigError, job_object_path
from imagen.store import ImageMeta
from tests.stage_context import OWNER, Stages, claimed, job, logged, make_stages, transitions
from tests.waiting import wait_until


@pytest.fixture
def stages(tmp_path: Path) -> Iterator[Stages]:
    chained = make_stages(tmp_path)
    chained.ctx.chain_for_worker(None)
    assert chained.ctx.chain_stages
    yield chained
    if "heartbeater" in chained.ctx.__dict__:
        # The heartbeat thread has no stop (one per worker process): park it instead.
        chained.ctx.heartbeater.interval = chained.ctx.heartbeater.check_interval = 3600


def fast_heartbeats(stages: Stages) -> None:
    """A heartbeat pass every 20 ms instead of every lease/4 (0.5 s at least)."""
    beats = stages.ctx.heartbeater
    beats.interval = beats.check_interval = 0.02


def heartbeat_at(stages: Stages, job_id: str) -> Any:
    return job(stages.store, job_id)["heartbeat_at"]


def test_a_chained_job_is_uploaded_recorded_and_done_in_its_generation_message(
    stages: Stages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="imagen.jobs")
    job_id = claimed(stages.store)
    path = job_object_path(OWNER, UUID(job_id), "image/png")

    run_generate(stages.ctx, job_id, 1)

    (upload,) = stages.storage.uploads
    assert (upload.path, upload.mime) == (path, "image/png")
    assert stages.objects() == [stages.root / "imagen" / path]
    (image,) = stages.store.images.values()
    assert (image["bucket"], image["path"], image["bytes"]) == ("imagen", path, upload.size)
    assert upload.size == (stages.root / "imagen" / path).stat().st_size
    row = job(stages.store, job_id)
    assert (row["status"], row["image_id"], row["error"]) == ("done", image["id"], None)
    assert len(stages.store.usage) == 1, "the provider call, recorded once"
    assert stages.broker.messages == [] and stages.handoff.entries == {}
    times = row["stage_times"]
    assert times["generating"] <= times["syncing"] <= times["done"]
    assert times["done"] - times["syncing"] < timedelta(seconds=60), "the upload's own time, not more"
    (synced,) = transitions(caplog, "synced")
    (done,) = transitions(caplog, "done")
    fields = {"job_id": job_id, "attempt": 1, "image_id": image["id"]}
    assert logged(synced) == {"event": "synced", "stage": "syncing", **fields}
    assert logged(done) == {"event": "done", "stage": "finalizing", **fields}


def test_a_chained_upload_refused_by_storage_fails_the_job_and_still_records_the_provider_call(
    stages: Stages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="imagen.jobs")
    job_id = claimed(stages.store)
    stages.storage.fail_put.append(StorageConfigError("bucket 'imagen' does not exist"))

    run_generate(stages.ctx, job_id, 1)

    error = "sync failed: bucket 'imagen' does not exist"
    assert (job(stages.store, job_id)["status"], job(stages.store, job_id)["error"]) == ("failed", error)
    (call,) = stages.store.usage.values()
    assert call.ok and call.job_id == UUID(job_id), "the provider was paid: its usage row is kept"
    assert stages.store.images == {} and stages.broker.messages == [] and stages.handoff.entries == {}
    (failed,) = transitions(caplog, "failed")
    assert logged(failed) == {
        "event": "failed",
        "job_id": job_id,
        "attempt": 1,
        "stage": "syncing",
        "error": error,
    }


def test_a_chained_upload_that_fails_transiently_goes_to_the_sync_stage_without_a_second_provider_call(
    stages: Stages,
) -> None:
    job_id = claimed(stages.store)
    stages.storage.fail_put.append(TransientStorageError("storage answered 503"))

    run_generate(stages.ctx, job_id, 1)  # no error: the sync stage's message owns the retries

    row = job(stages.store, job_id)
    assert (row["status"], row["last_error"]) == ("running", "sync: storage answered 503")
    assert len(stages.store.usage) == 1, "the provider call is recorded before the job moves on"
    (handed,) = stages.handoff.entries.items()
    assert handed[0] == (job_id, 1)
    assert handed[1].meta.mime == "image/png" and len(handed[1].data) == stages.storage.uploads[0].size
    backoff = stages.ctx.settings.retry_min_backoff_ms
    assert stages.broker.messages == [(SYNC_ACTOR, SYNC_QUEUE, (job_id, 1), backoff)], "after the backoff"

    run_sync(stages.ctx, job_id, 1)
    (finalize,) = [m for m in stages.broker.messages if m[0] == FINALIZE_ACTOR]
    assert finalize[1] == FINALIZE_QUEUE
    run_finalize(stages.ctx, *finalize[2])

    (image,) = stages.store.images.values()
    assert job(stages.store, job_id)["status"] == "done" and image["bytes"] == len(handed[1].data)
    assert len(stages.store.usage) == 1, "the provider was called once"


def test_a_chained_upload_whose_hand_off_fails_too_retries_the_generation_with_the_reason(
    stages: Stages,
) -> None:
    job_id = claimed(stages.store)
    stages.storage.fail_put.append(TransientStorageError("storage answered 503"))
    stages.handoff.fail_put.append(TransientError("hand-off to Redis failed: Connection refused"))

    with pytest.raises(TransientError, match="hand-off to Redis failed"):
        run_generate(stages.ctx, job_id, 1)

    row = job(stages.store, job_id)
    assert (row["status"], row["last_error"]) == (
        "running",
        "generation: hand-off to Redis failed: Connection refused",
    )
    assert stages.broker.messages == [] and stages.store.images == {}


def test_a_chained_job_cancelled_during_its_upload_keeps_no_image_and_is_never_logged_done(
    stages: Stages, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="imagen.jobs")
    job_id = claimed(stages.store)
    stages.storage.during_put.append(lambda: stages.store.cancel_job(job_id))

    run_generate(stages.ctx, job_id, 1)

    assert job(stages.store, job_id)["status"] == "cancelled"
    assert stages.store.images == {} and stages.objects() == []
    assert len(stages.store.usage) == 1, "the provider call is recorded, fence or not"
    assert transitions(caplog, "synced") == [] and transitions(caplog, "done") == []
    (dropped,) = transitions(caplog, "dropped")
    assert logged(dropped)["stage"] == "syncing"


def test_a_slow_chained_upload_keeps_its_jobs_lease_fresh(stages: Stages) -> None:
    fast_heartbeats(stages)
    job_id = claimed(stages.store)
    at_upload: list[Any] = []

    def slow_upload() -> None:
        at_upload.append(heartbeat_at(stages, job_id))
        wait_until(lambda: heartbeat_at(stages, job_id) > at_upload[0], timeout=5, message="a heartbeat")

    stages.storage.during_put.append(slow_upload)
    run_generate(stages.ctx, job_id, 1)

    assert job(stages.store, job_id)["status"] == "done"


def test_an_upload_past_the_stages_time_limit_gets_no_heartbeat_so_the_lease_can_take_the_job_back(
    stages: Stages,
) -> None:
    fast_heartbeats(stages)
    job_id, other = claimed(stages.store), claimed(stages.store)
    running = stages.store.begin_stage(job_id, 1, "generating")
    assert running is not None
    meta = ImageMeta(
        mime="image/png", width=16, height=16, backend="mock", model="m", prompt="a cat", params={}
    )
    seen: list[Any] = []

    def upload_after_a_beat_pass() -> None:
        seen.append(heartbeat_at(stages, job_id))
        beats = [heartbeat_at(stages, other)]
        for _ in range(2):  # two passes of the heartbeat thread since the upload began
            wait_until(lambda: heartbeat_at(stages, other) > beats[-1], timeout=5, message="a heartbeat pass")
            beats.append(heartbeat_at(stages, other))
        seen.append(heartbeat_at(stages, job_id))

    stages.storage.during_put.append(upload_after_a_beat_pass)
    limit = stages.ctx.settings.generate_time_limit
    with heartbeating(stages.ctx, other, 1, 60):  # another job's provider call, in the same worker
        sync_chained(stages.ctx, running, 1, b"png", meta, stage_started=time.monotonic() - limit)

    assert seen[0] == seen[1], "no heartbeat for a stage past its time limit"
