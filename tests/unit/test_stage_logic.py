"""The stage bodies on the in-memory job store: fences, cancel, hand-off loss, redelivery, errors.

No PostgreSQL and no Redis: the store is `InMemoryJobStore` (the conformance suite in
tests/store holds it to PostgresJobStore's rules), the hand-off a dict, storage a folder.
The same behaviour against the real servers is tests/integration/test_stages.py's.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from imagen.broker import FINALIZE_ACTOR, GENERATE_ACTOR, SYNC_ACTOR
from imagen.config import Settings
from imagen.errors import PermanentError, TransientError
from imagen.stages import StageContext, guarded, run_exhausted, run_finalize, run_generate, run_sync
from imagen.stages.lease import heartbeating
from imagen.store import InMemoryJobStore
from imagen.usage import UsageRecord
from tests.integration.conftest import RecordingBroker
from tests.stage_context import MOCK, OWNER, MemoryHandoff, claimed
from tests.waiting import wait_until


@pytest.fixture
def store() -> InMemoryJobStore:
    return InMemoryJobStore()


def make_ctx(store: InMemoryJobStore, tmp_path: Path, **settings: Any) -> StageContext:
    values: dict[str, Any] = {
        "storage": "local", "storage_dir": tmp_path / "storage", "output_dir": tmp_path / "out",
        "usage_spool_dir": tmp_path / "spool", "job_test_options": True, **settings,
    }  # fmt: skip
    return StageContext(
        Settings(_env_file=None, **values),  # type: ignore[call-arg]
        RecordingBroker(),
        store=store,
        handoff=MemoryHandoff(),  # type: ignore[arg-type]
    )


@pytest.fixture
def ctx(store: InMemoryJobStore, tmp_path: Path) -> Iterator[StageContext]:
    context = make_ctx(store, tmp_path)
    yield context
    context.close()


def status(store: InMemoryJobStore, job_id: str) -> tuple[str, int]:
    state = store.job_state(job_id)
    assert state is not None
    return state


def objects(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "storage").rglob("*") if p.is_file())


def sent(ctx: StageContext, actor: str) -> list[tuple[Any, ...]]:
    return [args for name, args in ctx.broker.sent if name == actor]


def taken_over(store: InMemoryJobStore, job_id: str) -> None:
    """Attempt 1's worker went silent: the lease rescue puts the job back, attempt 2 claims it."""
    store.jobs[UUID(job_id)]["heartbeat_at"] -= timedelta(seconds=700)
    assert store.rescue_expired(lease_seconds=600, max_attempts=3)
    (claim,) = store.claim_jobs(1)
    assert claim.attempt == 2


def test_a_stale_attempt_cannot_finish_or_fail_a_job_a_newer_attempt_holds(
    ctx: StageContext, store: InMemoryJobStore
) -> None:
    job_id = claimed(store)
    taken_over(store, job_id)

    run_finalize(ctx, job_id, 1, str(uuid4()))
    with guarded(ctx, job_id, 1, "generating"):
        raise PermanentError("the provider refused the prompt")
    run_generate(ctx, job_id, 1)

    assert status(store, job_id) == ("running", 2)
    job = store.get_job(job_id)
    assert job is not None and job["image_id"] is None and job["error"] is None
    assert ctx.broker.sent == [] and store.usage == {}, "the stale generation never called the provider"


def test_a_stale_attempts_call_is_told_to_give_up_and_never_refreshes_the_lease(
    store: InMemoryJobStore, tmp_path: Path
) -> None:
    ctx = make_ctx(store, tmp_path, lease_seconds=2)  # a beat every 0.5 s
    stale, live = claimed(store), claimed(store)
    taken_over(store, stale)
    before = {j: store.jobs[UUID(j)]["heartbeat_at"] for j in (stale, live)}

    with heartbeating(ctx, stale, 1, 60) as old, heartbeating(ctx, live, 1, 60) as current:
        wait_until(lambda: old.gone, timeout=10, message="the stale attempt's call is told it lost the job")
        wait_until(lambda: store.jobs[UUID(live)]["heartbeat_at"] > before[live], timeout=10)
        assert not current.gone

    assert store.jobs[UUID(stale)]["heartbeat_at"] == before[stale], "no heartbeat for a job it lost"


def test_a_job_cancelled_while_queued_never_reaches_the_provider(
    ctx: StageContext, store: InMemoryJobStore, tmp_path: Path
) -> None:
    job_id = claimed(store)
    assert store.cancel_job(job_id)

    run_generate(ctx, job_id, 1)

    assert status(store, job_id) == ("cancelled", 1)
    assert store.usage == {}, "no provider call: every call writes a usage row"
    assert ctx.broker.sent == [] and store.images == {} and objects(tmp_path) == []


def test_a_lost_hand_off_regenerates_the_image_at_the_same_attempt(
    ctx: StageContext, store: InMemoryJobStore
) -> None:
    job_id = claimed(store)
    run_generate(ctx, job_id, 1)
    assert sent(ctx, SYNC_ACTOR) == [(job_id, 1)]
    ctx.handoff.drop(job_id, 1)  # expired, or Redis lost it

    run_sync(ctx, job_id, 1)

    assert sent(ctx, GENERATE_ACTOR) == [(job_id, 1)], "generated again, not failed"
    assert status(store, job_id) == ("running", 1) and store.images == {}
    run_generate(ctx, job_id, 1)
    run_sync(ctx, job_id, 1)
    (finalize,) = sent(ctx, FINALIZE_ACTOR)
    run_finalize(ctx, *finalize)
    assert status(store, job_id) == ("done", 1)


def test_a_redelivered_sync_message_never_writes_a_second_image_row(
    ctx: StageContext, store: InMemoryJobStore, tmp_path: Path
) -> None:
    job_id = claimed(store)
    run_generate(ctx, job_id, 1)
    run_sync(ctx, job_id, 1)
    run_sync(ctx, job_id, 1)  # redelivered after the row was written

    first, again = sent(ctx, FINALIZE_ACTOR)
    assert first == again, "the redelivered sync goes on with the same image"
    run_finalize(ctx, *first)
    run_finalize(ctx, *again)  # fenced out: the job is done already

    (image,) = store.images.values()
    job = store.get_job(job_id)
    assert job is not None and (job["status"], job["image_id"]) == ("done", image["id"])
    assert len(objects(tmp_path)) == 1


def test_a_sync_redelivered_while_the_first_still_uploads_writes_one_image_row(
    ctx: StageContext, store: InMemoryJobStore, tmp_path: Path
) -> None:
    job_id = claimed(store)
    run_generate(ctx, job_id, 1)
    storage = ctx.storage
    put = storage.put
    uploads = []

    def slow_first_upload(*args: Any) -> Any:
        uploads.append(args[0])
        if len(uploads) == 1:
            run_sync(ctx, job_id, 1)  # the broker gave the message to another worker meanwhile
        return put(*args)

    storage.put = slow_first_upload  # type: ignore[method-assign]
    run_sync(ctx, job_id, 1)

    assert len(uploads) == 2 and len(set(uploads)) == 1, "both uploads went to the job's one path"
    first, second = sent(ctx, FINALIZE_ACTOR)
    assert first == second and len(store.images) == 1
    assert len(objects(tmp_path)) == 1


def test_a_chained_job_run_twice_has_one_image_row_and_one_usage_row(
    ctx: StageContext, store: InMemoryJobStore, tmp_path: Path
) -> None:
    ctx.chain_for_worker(None)
    job_id = claimed(store)
    run_generate(ctx, job_id, 1)
    run_generate(ctx, job_id, 1)  # redelivered after the job ended: fenced out

    assert status(store, job_id) == ("done", 1)
    assert len(store.images) == 1 and len(store.usage) == 1 and len(objects(tmp_path)) == 1
    assert ctx.broker.sent == [], "no hand-off and no other stage's message"


def test_a_job_cancelled_during_its_upload_keeps_no_image_row_and_no_object(
    ctx: StageContext, store: InMemoryJobStore, tmp_path: Path
) -> None:
    job_id = claimed(store)
    run_generate(ctx, job_id, 1)
    storage = ctx.storage
    put = storage.put

    def cancelled_meanwhile(*args: Any) -> Any:
        stored = put(*args)
        assert store.cancel_job(job_id)
        return stored

    storage.put = cancelled_meanwhile  # type: ignore[method-assign]
    run_sync(ctx, job_id, 1)

    assert status(store, job_id) == ("cancelled", 1)
    assert store.images == {} and objects(tmp_path) == []
    assert sent(ctx, FINALIZE_ACTOR) == []


def test_a_refused_job_fails_at_once_with_the_reason_and_a_transient_error_is_kept_for_the_retry(
    ctx: StageContext, store: InMemoryJobStore
) -> None:
    refused = claimed(store, {**MOCK, "fail": "permanent"})
    run_generate(ctx, refused, 1)
    job = store.get_job(refused)
    assert job is not None and job["status"] == "failed"
    assert job["error"].startswith("generation failed: ")

    flaky = claimed(store, {**MOCK, "fail": "transient"})
    with pytest.raises(TransientError):
        run_generate(ctx, flaky, 1)
    job = store.get_job(flaky)
    assert job is not None and job["status"] == "running"
    assert job["last_error"].startswith("generation: ")

    run_exhausted(ctx, {"actor_name": GENERATE_ACTOR, "args": [flaky, 1]}, {"retries": 2})
    job = store.get_job(flaky)
    assert job is not None and job["status"] == "failed"
    assert job["error"] == f"generation gave up after 3 tries: {job['last_error']}"


def test_an_owner_over_its_daily_image_quota_is_refused_before_the_provider_is_called(
    store: InMemoryJobStore, tmp_path: Path
) -> None:
    ctx = make_ctx(store, tmp_path, owner_daily_images=1)
    store.record_usage(
        UsageRecord(backend="mock", model="m", images=1, ok=True, latency_ms=1, owner_user_id=OWNER)
    )
    job_id = claimed(store)

    run_generate(ctx, job_id, 1)

    job = store.get_job(job_id)
    assert job is not None and job["status"] == "failed" and "daily image quota of 1" in job["error"]
    assert len(store.usage) == 1, "no provider call"
