"""The in-memory store leaves the same job row as PostgreSQL after every step of a job's life.

The other conformance tests check the columns each rule is about; this one runs one
script of calls on both stores side by side and compares every column a stage,
the listener or an operator reads, after each call (timestamps as set or not, and
as moved or not). A unit test on the memory store is only worth as much as this
agreement: a column the memory store forgets to set or clear would let a unit
test pass where PostgreSQL behaves otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

import pytest

from imagen.store import ImageRow, InMemoryJobStore, JobStore, PostgresJobStore
from imagen.usage import UsageRecord

pytestmark = pytest.mark.integration

OWNER = UUID("00000000-0000-4000-8000-0000000000ff")
COLUMNS = ("status", "stage", "attempt", "error", "last_error")
TIMES = ("claimed_at", "heartbeat_at", "finished_at", "pending_at", "image_swept_at")
LEASE = 600.0


def image_row(job_id: UUID) -> ImageRow:
    return ImageRow(
        job_id=job_id, bucket="imagen", path=f"{OWNER}/{job_id}.png", mime="image/png", width=64,
        height=64, bytes=100, prompt="a lighthouse", backend="mock", model="mock-1", params={"seed": 1},
    )  # fmt: skip


def usage(job_id: UUID) -> UsageRecord:
    return UsageRecord(
        backend="mock", model="mock-1", images=1, ok=True, latency_ms=2.0, owner_user_id=OWNER,
        job_id=job_id, call_id=uuid4(),
    )  # fmt: skip


class Side:
    """One store and the job it runs the script on; `seen` is the job's row after the last step."""

    def __init__(self, store: JobStore, age: Callable[[UUID, float], None]) -> None:
        self.store = store
        self.age = age
        self.job_id = store.submit_job(OWNER, "a lighthouse", {"backend": "mock", "n": 1})
        self.seen = self.row()

    def row(self) -> dict[str, Any]:
        row = self.store.get_job(self.job_id)
        assert row is not None
        return row

    def step(self, action: Callable[[Side], Any]) -> tuple[Any, dict[str, Any]]:
        """Run one call; its answer, and the row as the other store must show it too."""
        before, answer = self.seen, action(self)
        after = self.row()
        self.seen = after
        shape = {column: after[column] for column in COLUMNS}
        shape |= {f"{t} set": after[t] is not None for t in TIMES}
        shape |= {f"{t} moved": after[t] is not None and after[t] != before[t] for t in TIMES}
        if not getattr(action, "test_only", False):  # the harness's aging moves updated_at on PostgreSQL only
            shape["updated_at moved"] = after["updated_at"] > before["updated_at"]
        shape["stage_times"] = sorted(after["stage_times"])
        shape["image linked"] = after["image_id"] is not None
        shape["image_id changed"] = after["image_id"] != before["image_id"]
        shape["finished after claim"] = (
            after["finished_at"] >= after["claimed_at"]
            if after["finished_at"] and after["claimed_at"]
            else None
        )
        return _comparable(answer, self), shape


def _comparable(answer: Any, side: Side) -> Any:
    """A call's answer without what differs by nature (ids, timestamps)."""
    if isinstance(answer, UUID):
        return "the job" if answer == side.job_id else "an id"
    if isinstance(answer, tuple) and answer and hasattr(answer[0], "job_id"):  # begin_sync
        return tuple(_comparable(a, side) for a in answer)
    if isinstance(answer, list):
        return [_comparable(a, side) for a in answer]
    if hasattr(answer, "objects"):  # Discarded
        return (answer.status, answer.attempt, answer.row, len(answer.objects))
    if hasattr(answer, "status") and hasattr(answer, "attempt"):  # Rescued
        return (answer.status, answer.attempt)
    if hasattr(answer, "attempt") and hasattr(answer, "job_id"):  # Claim, RunningJob
        return (answer.attempt, answer.job_id == side.job_id)
    return answer


def aged(seconds: float) -> Callable[[Side], None]:
    def age(s: Side) -> None:
        s.age(s.job_id, seconds)

    age.test_only = True  # type: ignore[attr-defined]
    return age


def record(attempt: int, **kw: Any) -> Callable[[Side], Any]:
    def write(s: Side) -> Any:
        if kw.get("usage"):
            kw["usage"] = usage(s.job_id)
        return s.store.record_job_image(attempt, image_row(s.job_id), **kw)

    return write


def rescue(max_attempts: int) -> Callable[[Side], Any]:
    return lambda s: s.store.rescue_expired(lease_seconds=LEASE, max_attempts=max_attempts)


SCRIPTS: dict[str, list[Callable[[Side], Any]]] = {
    "separate stages to done": [
        lambda s: None,  # the submitted row
        lambda s: s.store.claim_jobs(5),
        lambda s: s.store.begin_stage(s.job_id, 1, "generating"),
        lambda s: s.store.note_transient(s.job_id, 1, "generation: 503 " + "x" * 3000),
        lambda s: s.store.heartbeat_many([(str(s.job_id), 1)]),
        lambda s: s.store.begin_sync(s.job_id, 1),
        record(1),
        lambda s: s.store.begin_sync(s.job_id, 1),
        lambda s: s.store.complete_job(s.job_id, 1, s.store.begin_sync(s.job_id, 1)[1] or uuid4()),
    ],
    "chained to done, then retried": [
        lambda s: s.store.claim_jobs(5),
        lambda s: s.store.note_transient(s.job_id, 1, "sync: 503"),
        record(1, complete_after=0.5, usage=True),
        lambda s: s.store.retry_job(s.job_id),
        lambda s: s.store.cancel_job(s.job_id),
        lambda s: s.store.retry_job(s.job_id),
        lambda s: s.store.claim_jobs(5),
        record(2, complete_after=0.0),
    ],
    "released, rescued, gave up, retried": [
        lambda s: s.store.claim_jobs(5),
        lambda s: s.store.release_claim(s.job_id, 1),
        lambda s: s.store.claim_jobs(5),
        aged(LEASE + 5),
        rescue(2),  # still queued: back to pending whatever the attempt
        lambda s: s.store.claim_jobs(5),
        lambda s: s.store.begin_stage(s.job_id, 2, "generating"),
        lambda s: s.store.note_transient(s.job_id, 2, "generation: timeout"),
        aged(LEASE + 5),
        rescue(2),  # at the maximum, in a stage: failed, with the last error
        lambda s: s.store.retry_job(s.job_id),
        lambda s: s.store.claim_jobs(5),
        lambda s: s.store.fail_job(s.job_id, 3, "generation failed: " + "y" * 5000),
        lambda s: s.store.cancel_job(s.job_id),
    ],
    "cancelled in a stage, then swept": [
        lambda s: s.store.claim_jobs(5),
        lambda s: s.store.begin_stage(s.job_id, 1, "generating"),
        record(1),
        lambda s: s.store.cancel_job(s.job_id),
        lambda s: s.store.heartbeat_many([(str(s.job_id), 1)]),
        lambda s: s.store.begin_sync(s.job_id, 1),
        lambda s: s.store.complete_job(s.job_id, 1, uuid4()),
        lambda s: s.store.sweep_ended(s.storage, limit=10),  # type: ignore[attr-defined]
        lambda s: s.store.sweep_ended(s.storage, limit=10),  # type: ignore[attr-defined]
        lambda s: s.store.retry_job(s.job_id),
    ],
}


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_the_memory_store_leaves_the_same_row_as_postgres_after_every_call(
    db_url: str, tmp_path: Any, script: str
) -> None:
    from imagen.storage import LocalStorage
    from tests.store.conftest import MemoryHarness, PostgresHarness

    memory, postgres = MemoryHarness(), PostgresHarness(db_url)
    assert isinstance(memory.store, InMemoryJobStore) and isinstance(postgres.store, PostgresJobStore)
    sides = [Side(memory.store, memory.age_heartbeat), Side(postgres.store, postgres.age_heartbeat)]
    for side, name in zip(sides, ("memory", "postgres"), strict=True):
        side.storage = LocalStorage(tmp_path / name, "imagen")  # type: ignore[attr-defined]

    for number, action in enumerate(SCRIPTS[script], 1):
        on_memory, on_postgres = (side.step(action) for side in sides)
        assert on_memory == on_postgres, f"step {number} of {script!r}"
