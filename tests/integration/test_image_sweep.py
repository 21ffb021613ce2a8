"""No image for a job that is not done: the stages' discard and the listener's sweep, on real PostgreSQL.

The race the row lock closes: an operator retries a cancelled job while its image is
being discarded. The retry must wait for the discard, so the new attempt uploads
after the delete and the done job keeps its object.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from imagen import jobs
from imagen.broker import FINALIZE_ACTOR
from imagen.config import Settings
from imagen.listener import Listener
from imagen.stages import StageContext, run_finalize, run_generate, run_sync
from imagen.storage import LocalStorage
from imagen.store.postgres_stages import UNSWEPT, sweep_ended
from tests.integration.conftest import RecordingBroker
from tests.integration.rows import scalar
from tests.waiting import wait_until

IMAGES = "SELECT count(*) FROM imagen.images WHERE job_id = %s"
STATUS = "SELECT status FROM imagen.jobs WHERE id = %s"


@pytest.fixture
def settings(db_url: str, redis_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url, redis_url=redis_url, storage="local", storage_dir=tmp_path / "storage",
        output_dir=tmp_path / "out", usage_spool_dir=tmp_path / "spool", listener_metrics_port=0,
        keep_local_copy=False,
    )  # fmt: skip


@pytest.fixture
def contexts(settings: Settings) -> Iterator[Callable[[], StageContext]]:
    made: list[StageContext] = []

    def make() -> StageContext:
        made.append(StageContext(settings, RecordingBroker()))
        return made[-1]

    yield make
    for ctx in made:
        ctx.close()


def objects(settings: Settings) -> list[Path]:
    return list(settings.storage_dir.rglob("*.png"))


def synced_then_cancelled(ctx: StageContext, db_url: str) -> tuple[uuid.UUID, int, str]:
    """A job whose images row and object are written (stage finalizing), then cancelled by its owner."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        jobs.submit_job(conn, uuid.uuid4(), "a cat", {"backend": "mock", "size": "16x16"})
        (claim,) = jobs.claim_jobs(conn, 1)
    run_generate(ctx, str(claim.job_id), claim.attempt)
    run_sync(ctx, str(claim.job_id), claim.attempt)
    (finalize,) = [args for actor, args in ctx.broker.sent if actor == FINALIZE_ACTOR]
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert jobs.cancel_job(conn, claim.job_id)
    return claim.job_id, claim.attempt, str(finalize[2])


class PausingStorage:
    """The real storage; `during_delete` runs before the first delete, while the discard holds its lock."""

    def __init__(self, inner: Any, during_delete: Callable[[], None]) -> None:
        self.inner, self.during_delete, self.bucket = inner, during_delete, inner.bucket

    def put(self, path: str, data: bytes, mime: str) -> Any:
        return self.inner.put(path, data, mime)

    def delete(self, path: str) -> bool:
        hook, self.during_delete = self.during_delete, lambda: None
        hook()
        return bool(self.inner.delete(path))

    def exists(self, path: str) -> bool:
        return bool(self.inner.exists(path))


@pytest.mark.parametrize("discard", ["final stage", "sweep"])
def test_operator_retry_racing_a_discard_leaves_the_done_job_its_object(
    contexts: Callable[[], StageContext], db_url: str, settings: Settings, discard: str
) -> None:
    first = contexts()
    job_id, attempt, image_id = synced_then_cancelled(first, db_url)
    retried = threading.Event()
    failures: list[BaseException] = []

    def operator_retries_and_a_worker_runs_it() -> None:
        try:
            with psycopg.connect(db_url, autocommit=True, application_name="operator-retry") as conn:
                assert jobs.retry_job(conn, job_id)
                (claim,) = jobs.claim_jobs(conn, 1)
            second = contexts()
            second.chain_for_worker(None)
            run_generate(second, str(job_id), claim.attempt)
            retried.set()
        except BaseException as exc:  # reported by the test thread
            failures.append(exc)
            retried.set()

    def retry_is_waiting_for_the_lock() -> bool:
        waiting = scalar(
            db_url,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'operator-retry'"
            " AND wait_event_type = 'Lock'",
        )
        return bool(waiting)

    worker = threading.Thread(target=operator_retries_and_a_worker_runs_it)

    def race() -> None:
        # Between the images row's delete and the object's: the retry and its whole new attempt
        # run now, unless the discard holds the job's row lock, which makes the retry wait.
        worker.start()
        wait_until(lambda: retried.is_set() or retry_is_waiting_for_the_lock(), timeout=30, interval=0.01)

    storage = PausingStorage(first.storage, race)
    if discard == "final stage":
        first.__dict__["storage"] = storage
        run_finalize(first, str(job_id), attempt, image_id)
    else:
        with psycopg.connect(db_url, autocommit=True) as conn:
            swept = sweep_ended(conn, storage)
        assert [s.job_id for s in swept] == [job_id]
    worker.join(30)
    assert not failures, failures
    assert scalar(db_url, STATUS, job_id) == "done"
    assert scalar(db_url, IMAGES, job_id) == 1
    assert len(objects(settings)) == 1, "the done job keeps its object"


def test_sweep_removes_the_image_a_lost_finalize_message_left_to_a_cancelled_job(
    contexts: Callable[[], StageContext], db_url: str, settings: Settings
) -> None:
    ctx = contexts()
    job_id, _, _ = synced_then_cancelled(ctx, db_url)  # and the finalize message is never run
    assert scalar(db_url, IMAGES, job_id) == 1 and len(objects(settings)) == 1
    with psycopg.connect(db_url, autocommit=True) as conn:
        (swept,) = sweep_ended(conn, ctx.storage)
        assert (swept.row, len(swept.objects)) == (True, 1)
        assert sweep_ended(conn, ctx.storage) == [], "each ended job is swept once"
    assert scalar(db_url, IMAGES, job_id) == 0 and objects(settings) == []
    run_finalize(ctx, str(job_id), 1, str(swept.job_id))  # the message turns up after all: nothing left


def test_sweep_removes_an_object_whose_images_row_was_never_written(db_url: str, settings: Settings) -> None:
    # A worker killed between its upload and its images row, and the job then failed.
    storage = LocalStorage(settings.storage_dir, settings.bucket)
    with psycopg.connect(db_url, autocommit=True) as conn:
        owner = uuid.uuid4()
        job_id = jobs.submit_job(conn, owner, "a cat", {})
        (claim,) = jobs.claim_jobs(conn, 1)
        storage.put(f"{owner}/{job_id}.png", b"png", "image/png")
        assert jobs.fail_job(conn, job_id, claim.attempt, "generation failed: refused")
        done_owner = uuid.uuid4()
        storage.put(f"{done_owner}/{uuid.uuid4()}.png", b"png", "image/png")  # another job's: kept
        (swept,) = sweep_ended(conn, storage)
    assert (swept.job_id, swept.row, swept.objects) == (job_id, False, [f"{owner}/{job_id}.png"])
    assert [p.parent.name for p in objects(settings)] == [str(done_owner)]


def test_sweep_leaves_running_and_done_jobs_alone(
    contexts: Callable[[], StageContext], db_url: str, settings: Settings
) -> None:
    ctx = contexts()
    ctx.chain_for_worker(None)
    with psycopg.connect(db_url, autocommit=True) as conn:
        for _ in range(2):
            jobs.submit_job(conn, uuid.uuid4(), "a cat", {"backend": "mock", "size": "16x16"})
        done, running = jobs.claim_jobs(conn, 2)
    run_generate(ctx, str(done.job_id), done.attempt)
    with psycopg.connect(db_url, autocommit=True) as conn:
        assert sweep_ended(conn, ctx.storage) == []
    assert scalar(db_url, STATUS, done.job_id) == "done" and len(objects(settings)) == 1
    assert scalar(db_url, STATUS, running.job_id) == "running"


def test_listener_sweeps_on_its_poll(
    contexts: Callable[[], StageContext], db_url: str, settings: Settings
) -> None:
    ctx = contexts()
    job_id, _, _ = synced_then_cancelled(ctx, db_url)
    listener = Listener(settings, broker=RecordingBroker(), metrics_port=0)
    listener._connect()
    try:
        assert listener.sweep() == 1
        assert listener.sweep() == 0
    finally:
        listener._close()
    assert listener.stats.swept == 1
    assert scalar(db_url, IMAGES, job_id) == 0 and objects(settings) == []


def test_the_sweep_reads_only_the_jobs_still_to_sweep(db_url: str) -> None:
    # Every poll runs it: on a table of many finished jobs it must walk the partial index of
    # unswept ones (migration 007), not the jobs.
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO imagen.jobs (owner_user_id, prompt, status, finished_at)"
            " SELECT gen_random_uuid(), 'p', CASE WHEN i % 500 = 0 THEN 'failed' ELSE 'done' END, now()"
            " FROM generate_series(1, 5000) i"
        )
        conn.execute("ANALYZE imagen.jobs")
        (plan,) = conn.execute("EXPLAIN (FORMAT JSON) " + UNSWEPT, {"limit": 100}).fetchone() or (None,)
    text = json.dumps(plan)
    assert "jobs_unswept_idx" in text, text
