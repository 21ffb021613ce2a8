"""The stages' statements on PostgreSQL: a job's image row under its fence, the discard of an ended
job's image, usage rows, the quota reads, and the heartbeat thread's look-up.

`PostgresStageStore` is the part of `PostgresJobStore` the stages use beyond the
job row's fenced writes. Every images statement locks or updates the job row in
the same statement, so the image and the job always agree, and none ever writes
an image for a job this attempt no longer holds. The owner of an images row is
the locked job's owner, never a value the caller passes (except for an image
without a job, `imagen generate --sync`), and every statement matches a row on
job id AND owner: none can return, link or delete another owner's row (issue 14;
`imagen.images.job_id` also references the job, sql/006_job_ownership.sql).

No image for a job that is not done: `discard_ended` removes a failed or
cancelled job's images row and the objects at its path while it holds the job's
row lock, so an operator retry waits for the lock and its new attempt uploads
after the delete, never before it; a done or running job (a newer attempt writes
the very same path) is never touched. The stages call it when their fence fails;
the listener's sweep (`sweep_ended`) for every job that ended since it was last
swept. Both are idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import fields
from typing import TYPE_CHECKING, Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

from imagen import jobs
from imagen.errors import ImagenError
from imagen.jobs import Conn, RunningJob, execute_once
from imagen.logs import transition
from imagen.storage import EXTENSIONS, Storage, job_object_path
from imagen.store.queries import QUERIES
from imagen.store.rows import Discarded, ImageRow
from imagen.usage import UsageRecord

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

    from imagen.usage_spool import UsageSpool

log = logging.getLogger(__name__)

# The statements are in imagen/store/queries.sql, with why each is written as it is.
INSERT_USAGE = QUERIES["insert_usage"]
UNSWEPT = QUERIES["unswept"]
_USAGE_PARAMS = ["u_" + f.name for f in fields(UsageRecord)]


def usage_params(record: UsageRecord | None) -> dict[str, Any]:
    """The `u_` parameters of the usage_insert fragment for one record; all NULL for none (the chained
    end without a provider call's usage writes no usage row)."""
    if record is None:
        return dict.fromkeys(_USAGE_PARAMS)
    # Not asdict(): it deep-copies `raw` on every record only for Jsonb to wrap it.
    params = {"u_" + f.name: getattr(record, f.name) for f in fields(record)}
    params["u_raw"] = Jsonb(record.raw)
    return params


def image_params(image: ImageRow) -> dict[str, Any]:
    """The parameters of the images statements for one row."""
    params = image.values()
    params["params"] = Jsonb(params["params"] or {})
    return params


def discard_ended(conn: Conn, job_id: UUID | str, storage: Storage) -> Discarded | None:
    """Remove a failed or cancelled job's images row and the objects at its path, under its row lock.

    None when the job is not failed or cancelled (done, running, pending, gone): nothing is
    touched. A storage error rolls the row delete back too (and propagates), so the next
    try finds both as they were. On an autocommit connection with no transaction open.
    """
    with conn.transaction():
        row = conn.execute(QUERIES["lock_ended"], {"id": job_id}).fetchone()
        if row is None:
            return None
        status, owner, attempt = row
        deleted = conn.execute(QUERIES["delete_image"], {"id": job_id, "owner": owner}).fetchall()
        # Every path the job's image can have: the row's, and the deterministic one for each
        # type (an upload whose images row was never written leaves no other trace).
        paths = {r[0] for r in deleted} | {job_object_path(owner, UUID(str(job_id)), m) for m in EXTENSIONS}
        in_use = conn.execute(QUERIES["paths_in_use"], {"bucket": storage.bucket, "paths": sorted(paths)})
        paths -= {r[0] for r in in_use.fetchall()}
        objects = [path for path in sorted(paths) if storage.delete(path)]
        conn.execute(QUERIES["mark_swept"], {"id": job_id})
    return Discarded(UUID(str(job_id)), status, attempt, bool(deleted), objects)


def sweep_ended(conn: Conn, storage: Storage, *, limit: int = 100) -> list[Discarded]:
    """Discard the image of up to `limit` jobs that ended failed or cancelled since their last sweep.

    Returns the jobs that had something to remove; each gets a `swept` log line. A job
    whose storage call fails stays unswept (logged) and is tried again at the next sweep.
    """
    found = []
    for (job_id,) in conn.execute(UNSWEPT, {"limit": limit}).fetchall():
        try:
            done = discard_ended(conn, job_id, storage)
        except ImagenError as exc:
            log.warning("sweep: could not remove the image of job %s: %s; will try again", job_id, exc)
            continue
        if done is not None and done.removed_anything:
            transition(
                "swept", job_id, done.attempt, None, status=done.status, images_row=done.row,
                objects=len(done.objects),
            )  # fmt: skip
            found.append(done)
    return found


class PostgresStageStore:
    """The stages' part of `PostgresJobStore` (each call one short use of a pooled connection)."""

    connect: Callable[[], AbstractContextManager[Any]]
    pool: ConnectionPool[Any] | None = None
    # What a call raises when the database is away or refuses: the stages note it and retry.
    errors: tuple[type[BaseException], ...] = (psycopg.Error,)

    def begin_sync(self, job_id: UUID | str, attempt: int) -> tuple[RunningJob | None, UUID | None]:
        with self.connect() as conn:
            row = execute_once(conn, QUERIES["begin_sync"], {"id": job_id, "attempt": attempt}).fetchone()
        if row is None:
            return None, None
        job = RunningJob(
            job_id=row[0], owner_user_id=row[1], prompt=row[2], params_json=row[3], attempt=row[4],
            created_at=row[5], claimed_at=row[6],
        )  # fmt: skip
        return job, (UUID(str(row[7])) if row[7] else None)

    def record_job_image(
        self,
        attempt: int,
        image: ImageRow,
        *,
        complete_after: float | None = None,
        usage: UsageRecord | None = None,
    ) -> UUID | None:
        params = image_params(image)
        params["attempt"] = attempt
        query = QUERIES["record_job_image"]
        if complete_after is not None:
            params["sync_seconds"] = max(0.0, complete_after)
            params.update(usage_params(usage))
            query = QUERIES["record_and_complete"]
        with self.connect() as conn:
            row = execute_once(conn, query, params).fetchone()
        return UUID(str(row[0])) if row else None

    def insert_image(self, image: ImageRow, owner_user_id: UUID | None) -> UUID:
        with self.connect() as conn:
            params = {**image_params(image), "owner_user_id": owner_user_id}
            row = execute_once(conn, QUERIES["insert_image"], params).fetchone()
        assert row is not None
        return UUID(str(row[0]))

    def record_usage(self, record: UsageRecord) -> None:
        with self.connect() as conn:
            conn.execute(INSERT_USAGE, usage_params(record))

    def replay_usage(self, spool: UsageSpool) -> int:
        return spool.replay(self.connect)

    def discard_ended(self, job_id: UUID | str, storage: Storage) -> Discarded | None:
        with self.connect() as conn:
            return discard_ended(conn, job_id, storage)

    def sweep_ended(self, storage: Storage, *, limit: int = 100) -> list[Discarded]:
        with self.connect() as conn:
            return sweep_ended(conn, storage, limit=limit)

    def still_running(self, keys: list[tuple[str, int]]) -> set[tuple[str, int]]:
        with self.connect() as conn:
            return jobs.still_running(conn, keys)

    def owner_quota(self, owner_user_id: UUID) -> tuple[int | None, float | None] | None:
        with self.connect() as conn:
            row = conn.execute(QUERIES["owner_quota"], {"owner": owner_user_id}).fetchone()
        return None if row is None else (row[0], None if row[1] is None else float(row[1]))

    def owner_quotas(self, limit: int) -> dict[UUID, tuple[int | None, float | None]]:
        with self.connect() as conn:
            rows = conn.execute(QUERIES["owner_quotas"], {"limit": limit}).fetchall()
        return {row[0]: (row[1], None if row[2] is None else float(row[2])) for row in rows}

    def used_today(self, owner_user_id: UUID) -> tuple[int, float]:
        with self.connect() as conn:
            row = conn.execute(QUERIES["used_today"], {"owner": owner_user_id}).fetchone()
        assert row is not None
        return int(row[0]), float(row[1])

    def recover(self, exc: BaseException) -> None:
        """After a failed call: when the server dropped connections (a restart, a failover, a
        terminated backend), the pool's idle ones are likely dead too. Test them now, or each
        retry may draw the next dead one."""
        if self.pool is not None and isinstance(exc, psycopg.OperationalError):
            self.pool.check()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
