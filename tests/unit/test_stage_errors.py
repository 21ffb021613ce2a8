"""What a stage's error does to its job, on the in-memory store: the text the job's owner reads,
the retry it gets, and the log line an operator reads when a message is dropped.

The same rules against PostgreSQL run in tests/integration/test_stages.py.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from imagen.errors import PermanentError, TransientError
from imagen.stages.context import StageContext
from imagen.stages.errors import drop, guarded, usage_first
from imagen.store import InMemoryJobStore
from imagen.usage import HeldSink, UsageRecord
from tests.stage_context import claimed
from tests.unit.test_stage_logic import make_ctx, taken_over


class DisconnectedStore(InMemoryJobStore):
    """A store whose connection is gone: every write of a transient error fails."""

    errors: tuple[type[BaseException], ...] = (ConnectionError,)

    def __init__(self) -> None:
        super().__init__()
        self.recovered: list[BaseException] = []

    def note_transient(self, job_id: Any, attempt: int, error: str) -> bool:
        raise ConnectionError("server closed the connection unexpectedly")

    def recover(self, exc: BaseException) -> None:
        self.recovered.append(exc)


@pytest.fixture
def store() -> InMemoryJobStore:
    return InMemoryJobStore()


@pytest.fixture
def ctx(store: InMemoryJobStore, tmp_path: Path) -> StageContext:
    return make_ctx(store, tmp_path)


def job(store: InMemoryJobStore, job_id: str) -> dict[str, Any]:
    row = store.get_job(job_id)
    assert row is not None
    return row


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "imagen.jobs"]


@pytest.fixture(autouse=True)
def _transitions(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="imagen.jobs")


@pytest.mark.parametrize(
    ("stage", "named"),
    [("generating", "generation"), ("syncing", "sync"), ("finalizing", "finalize"), ("resizing", "resizing")],
)
def test_a_permanent_error_fails_the_job_at_once_naming_the_stage_and_the_reason(
    ctx: StageContext, store: InMemoryJobStore, caplog: pytest.LogCaptureFixture, stage: str, named: str
) -> None:
    job_id = claimed(store)

    with guarded(ctx, job_id, 1, stage):
        raise PermanentError("the provider refused the prompt")

    failed = job(store, job_id)
    assert (failed["status"], failed["error"]) == (
        "failed",
        f"{named} failed: the provider refused the prompt",
    )
    assert logged(caplog) == [
        f"job {job_id} attempt=1 stage={stage} failed error={named} failed: the provider refused the prompt"
    ]


def test_a_transient_error_is_kept_on_the_job_and_raised_again_for_the_retry(
    ctx: StageContext, store: InMemoryJobStore, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = claimed(store)

    with pytest.raises(TransientError), guarded(ctx, job_id, 1, "syncing"):
        raise TransientError("storage answered 503")

    running = job(store, job_id)
    assert (running["status"], running["last_error"], running["error"]) == (
        "running",
        "sync: storage answered 503",
        None,
    )
    assert logged(caplog) == [
        f"job {job_id} attempt=1 stage=syncing retrying error=sync: storage answered 503"
    ]


def test_an_unexpected_error_is_retried_and_kept_with_its_type(
    ctx: StageContext, store: InMemoryJobStore, caplog: pytest.LogCaptureFixture
) -> None:
    # A bug or a dropped connection: the type is all an owner has to go on once the retries run out.
    job_id = claimed(store)

    with pytest.raises(KeyError), guarded(ctx, job_id, 1, "finalizing"):
        raise KeyError("image_id")

    running = job(store, job_id)
    assert (running["status"], running["last_error"]) == ("running", "finalize: KeyError: 'image_id'")
    assert logged(caplog) == [
        f"job {job_id} attempt=1 stage=finalizing retrying error=finalize: KeyError: 'image_id'"
    ]


def test_a_transient_error_the_database_cannot_take_is_logged_and_still_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = DisconnectedStore()
    ctx = make_ctx(store, tmp_path)
    job_id = claimed(store)
    error = TransientError("provider answered 503")

    with pytest.raises(TransientError), guarded(ctx, job_id, 1, "generating"):
        raise error

    assert store.recovered == [error], "the store gets to reset its connection first"
    assert job(store, job_id)["last_error"] is None
    warnings = [r.getMessage() for r in caplog.records if r.name == "imagen.stages"]
    assert warnings == [f"could not record transient error for job {job_id}"]
    assert logged(caplog) == [
        f"job {job_id} attempt=1 stage=generating retrying error=generation: provider answered 503"
    ]


def test_a_stale_attempts_error_leaves_the_job_alone_and_says_who_holds_it(
    ctx: StageContext, store: InMemoryJobStore, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = claimed(store)
    taken_over(store, job_id)

    with guarded(ctx, job_id, 1, "syncing"):
        raise PermanentError("storage refused the object")

    assert (job(store, job_id)["status"], job(store, job_id)["error"]) == ("running", None)
    assert logged(caplog) == [
        f"job {job_id} attempt=1 stage=syncing dropped reason=job is running at attempt 2"
    ]


def test_a_message_for_an_ended_or_unknown_job_is_dropped_with_the_reason_logged(
    ctx: StageContext, store: InMemoryJobStore, caplog: pytest.LogCaptureFixture
) -> None:
    cancelled = claimed(store)
    assert store.cancel_job(cancelled)
    unknown = str(uuid4())

    drop(ctx, cancelled, 1, "generating")
    drop(ctx, unknown, 3, "finalizing")

    assert logged(caplog) == [
        f"job {cancelled} attempt=1 stage=generating dropped reason=job is cancelled at attempt 1",
        f"job {unknown} attempt=3 stage=finalizing dropped reason=job not found",
    ]


def test_a_held_usage_row_is_written_before_the_error_changes_the_job(
    ctx: StageContext, store: InMemoryJobStore
) -> None:
    job_id = claimed(store)
    held = HeldSink()
    call = UsageRecord(backend="mock", model="m", images=1, ok=True, latency_ms=1, owner_user_id=UUID(int=1))
    usage_at_failure: list[int] = []
    fail_job = store.fail_job

    def failing(*args: Any) -> bool:
        usage_at_failure.append(len(store.usage))
        return fail_job(*args)

    store.fail_job = failing  # type: ignore[method-assign]
    with guarded(ctx, job_id, 1, "syncing"), usage_first(ctx, held):
        held.record(call)
        raise PermanentError("storage refused the object")

    assert usage_at_failure == [1], "whoever sees the job failed also sees what its call cost"
    assert held.records == []
