"""The job store on PostgreSQL: each call one short use of a pooled autocommit connection.

Statements are committed when a method returns (`imagen.jobs.execute_once`);
FOR UPDATE SKIP LOCKED and the row locks are what make several listeners and
workers safe together. It must never hold a connection between calls.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any
from uuid import UUID

from imagen import image_sweep, job_images, jobs
from imagen.storage import Storage
from imagen.store.base import JobId
from imagen.store.postgres_operator import PostgresOperatorStore
from imagen.store.rows import Claim, Discarded, ImageRow, Rescued, RunningJob
from imagen.usage import INSERT_USAGE, UsageRecord, usage_params

Connect = Callable[[], AbstractContextManager[Any]]


class PostgresJobStore(PostgresOperatorStore):
    """`JobStore` over a connection factory: a pool's `connection` method, or one that opens one.

    The operator's reads are `PostgresOperatorStore`'s (postgres_operator.py, operator.sql).
    """

    def __init__(self, connect: Connect) -> None:
        self.connect = connect

    @classmethod
    def from_url(cls, conninfo: str, *, application_name: str = "imagen") -> PostgresJobStore:
        """A store opening one connection per call (the operator commands, tests)."""
        from imagen.db import connect

        return cls(lambda: connect(conninfo, autocommit=True, application_name=application_name))

    def submit_job(self, owner_user_id: UUID, prompt: str, params: Any) -> UUID:
        with self.connect() as conn:
            return jobs.submit_job(conn, owner_user_id, prompt, params, as_owner=False)

    def claim_jobs(self, limit: int, *, max_owners: int = 1000) -> list[Claim]:
        with self.connect() as conn:
            return jobs.claim_jobs(conn, limit, max_owners=max_owners)

    def count_running(self) -> int:
        with self.connect() as conn:
            return jobs.count_running(conn)

    def claim_within_cap(self, limit: int, max_in_flight: int) -> tuple[list[Claim], int | None]:
        with self.connect() as conn:
            return jobs.claim_within_cap(conn, limit, max_in_flight)

    def release_claim(self, job_id: JobId, attempt: int) -> bool:
        with self.connect() as conn:
            return jobs.release_claim(conn, UUID(str(job_id)), attempt)

    def rescue_expired(self, *, lease_seconds: float, max_attempts: int, limit: int = 1000) -> list[Rescued]:
        with self.connect() as conn:
            return jobs.rescue_expired(
                conn, lease_seconds=lease_seconds, max_attempts=max_attempts, limit=limit
            )

    def begin_stage(self, job_id: JobId, attempt: int, stage: str) -> RunningJob | None:
        with self.connect() as conn:
            return jobs.begin_stage(conn, job_id, attempt, stage)

    def begin_sync(self, job_id: JobId, attempt: int) -> tuple[RunningJob | None, UUID | None]:
        with self.connect() as conn:
            return job_images.begin_sync(conn, job_id, attempt)

    def heartbeat_many(self, keys: list[tuple[str, int]]) -> int:
        with self.connect() as conn:
            return jobs.heartbeat_many(conn, keys)

    def note_transient(self, job_id: JobId, attempt: int, error: str) -> bool:
        with self.connect() as conn:
            return jobs.note_transient(conn, job_id, attempt, error)

    def fail_job(self, job_id: JobId, attempt: int, error: str) -> bool:
        with self.connect() as conn:
            return jobs.fail_job(conn, job_id, attempt, error)

    def complete_job(self, job_id: JobId, attempt: int, image_id: JobId) -> bool:
        with self.connect() as conn:
            return jobs.complete_job(conn, job_id, attempt, image_id)

    def record_job_image(
        self,
        attempt: int,
        image: ImageRow,
        *,
        complete_after: float | None = None,
        usage: UsageRecord | None = None,
    ) -> UUID | None:
        with self.connect() as conn:
            return job_images.record_job_image(
                conn, attempt, image.values(), complete_after=complete_after, usage=usage
            )

    def record_usage(self, record: UsageRecord) -> None:
        with self.connect() as conn:
            conn.execute(INSERT_USAGE, usage_params(record))

    def job_state(self, job_id: JobId) -> tuple[str, int] | None:
        with self.connect() as conn:
            return jobs.job_state(conn, job_id)

    def get_job(self, job_id: JobId) -> dict[str, Any] | None:
        with self.connect() as conn:
            return jobs.get_job(conn, job_id)

    def cancel_job(self, job_id: JobId) -> bool:
        with self.connect() as conn:
            return jobs.cancel_job(conn, job_id)

    def retry_job(self, job_id: JobId) -> bool:
        with self.connect() as conn:
            return jobs.retry_job(conn, job_id)

    def discard_ended(self, job_id: JobId, storage: Storage) -> Discarded | None:
        with self.connect() as conn:
            return image_sweep.discard_ended(conn, job_id, storage)

    def sweep_ended(self, storage: Storage, *, limit: int = 100) -> list[Discarded]:
        with self.connect() as conn:
            return image_sweep.sweep_ended(conn, storage, limit=limit)
