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

from imagen import jobs
from imagen.store.base import JobId
from imagen.store.postgres_operator import PostgresOperatorStore
from imagen.store.postgres_stages import PostgresStageStore
from imagen.store.rows import Claim, Rescued, RunningJob

Connect = Callable[[], AbstractContextManager[Any]]


class PostgresJobStore(PostgresStageStore, PostgresOperatorStore):
    """`JobStore` over a connection factory: a pool's `connection` method, or one that opens one.

    The images, usage, quota and sweep statements the stages use are `PostgresStageStore`'s
    (postgres_stages.py); the operator's reads are `PostgresOperatorStore`'s (postgres_operator.py,
    operator.sql).
    """

    def __init__(self, connect: Connect) -> None:
        self.connect = connect

    @classmethod
    def pooled(cls, conninfo: str, *, application_name: str, max_size: int = 16) -> PostgresJobStore:
        """A store on its own connection pool (the workers'), opened now: create it after the fork."""
        from psycopg_pool import ConnectionPool

        pool: ConnectionPool[Any] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=max_size,
            kwargs={"autocommit": True, "application_name": application_name},
            open=True,
            # No per-checkout health check: it would add a round trip to every statement. A connection
            # that died with the server fails its next use, the stage is retried, `recover` tests the rest.
        )
        store = cls(pool.connection)
        store.pool = pool
        return store

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
