"""A job's image row, written only under the job's fence, for its owner only.

The statements that tie an `imagen.images` row to its job: the sync stage's
start, the images row (once per job, ON CONFLICT on the unique job_id), the
chained path's row-and-done. Each locks or updates the job row in the same
statement, so the image and the job always agree; none of them ever writes an
image for a job this attempt no longer holds. The owner of an images row is the
locked job's owner, never a value the caller passes, and every statement matches
a row on job id AND owner: no statement here can return, link or delete another
owner's row (issue 14; `imagen.images.job_id` also references the job,
sql/006_job_ownership.sql). The discard of an ended job's image is
`imagen.image_sweep`. `imagen generate --sync` uses `insert_image`, without a job.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from imagen.jobs import Conn, RunningJob, execute_once
from imagen.store.queries import QUERIES
from imagen.usage import UsageRecord, usage_params

# The statements are in imagen/store/queries.sql, with why each is written as it is.
INSERT_IMAGE = QUERIES["insert_image"]
BEGIN_SYNC = QUERIES["begin_sync"]
RECORD_JOB_IMAGE = QUERIES["record_job_image"]
RECORD_AND_COMPLETE = QUERIES["record_and_complete"]
RECORD_USAGE_AND_COMPLETE = QUERIES["record_usage_and_complete"]


def insert_image(conn: Conn, values: dict[str, Any]) -> UUID:
    """Insert the images row; a second insert for the same job returns the first row's id."""
    from psycopg.types.json import Jsonb

    params = dict(values)
    params["params"] = Jsonb(params.get("params") or {})
    row = execute_once(conn, INSERT_IMAGE, params).fetchone()
    assert row is not None
    return UUID(str(row[0]))


def begin_sync(conn: Conn, job_id: UUID | str, attempt: int) -> tuple[RunningJob | None, UUID | None]:
    """Start the sync stage (fenced); also the image id if a previous run already recorded it."""
    row = execute_once(conn, BEGIN_SYNC, {"id": job_id, "attempt": attempt}).fetchone()
    if row is None:
        return None, None
    job = RunningJob(
        job_id=row[0], owner_user_id=row[1], prompt=row[2], params_json=row[3], attempt=row[4],
        created_at=row[5], claimed_at=row[6],
    )  # fmt: skip
    return job, (UUID(str(row[7])) if row[7] else None)


def record_job_image(
    conn: Conn,
    attempt: int,
    values: dict[str, Any],
    *,
    complete_after: float | None = None,
    usage: UsageRecord | None = None,
) -> UUID | None:
    """Write a job's images row (once per job) if `attempt` still holds it; None when the fence failed.

    With `complete_after` (seconds the sync took so far), the same statement also marks the
    job done and links the row: the chained path's last write. With `usage` too, it also
    writes that usage row, fence or not.
    """
    from psycopg.types.json import Jsonb

    params = dict(values)
    params["params"] = Jsonb(params.get("params") or {})
    params["attempt"] = attempt
    if complete_after is None:
        row = execute_once(conn, RECORD_JOB_IMAGE, params).fetchone()
    else:
        params["sync_seconds"] = max(0.0, complete_after)
        query = RECORD_AND_COMPLETE
        if usage is not None:
            params.update(usage_params(usage, "u_"))
            query = RECORD_USAGE_AND_COMPLETE
        row = execute_once(conn, query, params).fetchone()
    return UUID(str(row[0])) if row else None
