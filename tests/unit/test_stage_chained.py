"""The chained stages (IMAGEN_CHAIN_STAGES) on the in-memory store: generate, sync and finish in one message.

What a user or operator notices: the job done with one object and one images row from
its generation message, its stage times, its provider call recorded once whatever
happens, a failing upload handed to the sync stage instead of calling the provider
again, and the job's lease kept fresh during a slow upload but not past its time limit.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from imagen.broker import FINALIZE_ACTOR, FINALIZE_QUEUE, SYNC_ACTOR, SYNC_QUEUE
from imagen.errors import TransientError, TransientStorageError
from imagen.stages import run_finalize, run_generate, run_sync
from imagen.stages.chained import sync_chained
from imagen.stages.lease import Heartbeater, heartbeating
from imagen.storage import StorageConfigError, job_object_path
from imagen.store import ImageMeta
from tests.stage_context import OWNER, Stages, claimed, job, logged, make_stages, transitions
from tests.unit.test_stage_lease import Ticks


@pytest.fixture
def stages(tmp_path: Path) -> Stages:
    return chained(make_stages(tmp_path))


def chained(stages: Stages) -> Stages:
    stages.ctx.chain_for_worker(None)
    assert stages.ctx.chain_stages
    return stages


def stepped(tmp_path: Path, ticks: Ticks) -> Stages:
    """Chained stages on the test's clock, their heartbeat thread a pass per step (0.5 s, the lease 2 s)."""
    stages = chained(make_stages(tmp_path, clock=ticks.clock, lease_seconds=2))
    stages.ctx.heartbeater = Heartbeater(stages.store, 2, clock=ticks.clock, wait=ticks.wait)
    return stages


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


def test_a_slow_chained_upload_keeps_its_jobs_lease_fresh(tmp_path: Path) -> None:
    ticks = Ticks()
    stages = stepped(tmp_path, ticks)
    job_id = claimed(stages.store)
    seen: list[Any] = []

    def slow_upload() -> None:
        seen.append(heartbeat_at(stages, job_id))
        ticks.step()  # half a second into the upload: a heartbeat pass
        seen.append(heartbeat_at(stages, job_id))

    stages.storage.during_put.append(slow_upload)
    run_generate(stages.ctx, job_id, 1)

    assert seen[1] > seen[0], "the upload's job got a heartbeat"
    assert job(stages.store, job_id)["status"] == "done"


def test_an_upload_past_the_stages_time_limit_gets_no_heartbeat_so_the_lease_can_take_the_job_back(
    tmp_path: Path,
) -> None:
    ticks = Ticks()
    stages = stepped(tmp_path, ticks)
    job_id, other = claimed(stages.store), claimed(stages.store)
    running = stages.store.begin_stage(job_id, 1, "generating")
    assert running is not None
    meta = ImageMeta(
        mime="image/png", width=16, height=16, backend="mock", model="m", prompt="a cat", params={}
    )
    seen: dict[str, list[Any]] = {job_id: [], other: []}

    def upload_during_a_heartbeat_pass() -> None:
        for key, beats in seen.items():
            beats.append(heartbeat_at(stages, key))
        ticks.step()
        for key, beats in seen.items():
            beats.append(heartbeat_at(stages, key))

    stages.storage.during_put.append(upload_during_a_heartbeat_pass)
    limit = stages.ctx.settings.generate_time_limit
    with heartbeating(stages.ctx, other, 1, 60):  # another job's provider call, in the same worker
        sync_chained(stages.ctx, running, 1, b"png", meta, stage_started=ticks.now - limit)

    assert seen[other][1] > seen[other][0], "the pass refreshed the job still in its time limit"
    assert seen[job_id][1] == seen[job_id][0], "no heartbeat for a stage past its time limit"
