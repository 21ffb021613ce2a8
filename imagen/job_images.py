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
from imagen.usage import UsageRecord, usage_insert, usage_params

INSERT_IMAGE = """
INSERT INTO imagen.images (owner_user_id, job_id, bucket, path, mime, width, height, bytes, prompt,
                           backend, model, params)
VALUES (%(owner_user_id)s, %(job_id)s, %(bucket)s, %(path)s, %(mime)s, %(width)s, %(height)s, %(bytes)s,
        %(prompt)s, %(backend)s, %(model)s, %(params)s)
ON CONFLICT (job_id) DO UPDATE SET job_id = imagen.images.job_id
RETURNING id
"""

# The sync stage's start: fence + stage + heartbeat, and whether an earlier run already wrote the row.
BEGIN_SYNC = """
UPDATE imagen.jobs j
SET stage = 'syncing', heartbeat_at = now(),
    stage_times = j.stage_times || jsonb_build_object('syncing', now())
WHERE j.id = %(id)s AND j.attempt = %(attempt)s AND j.status = 'running'
RETURNING j.id, j.owner_user_id, j.prompt, j.params::text, j.attempt, j.created_at, j.claimed_at,
          (SELECT i.id FROM imagen.images i WHERE i.job_id = j.id AND i.owner_user_id = j.owner_user_id)
"""

# Fence, row and stage in one statement: the UPDATE locks the job row, so the images row is
# written only while this attempt still holds the job, and a cancel waits for the commit.
RECORD_JOB_IMAGE = """
WITH fence AS (
    UPDATE imagen.jobs
    SET stage = 'finalizing', heartbeat_at = now(),
        stage_times = stage_times || jsonb_build_object('finalizing', now())
    WHERE id = %(job_id)s AND attempt = %(attempt)s AND status = 'running'
    RETURNING id, owner_user_id
)
INSERT INTO imagen.images (owner_user_id, job_id, bucket, path, mime, width, height, bytes, prompt,
                           backend, model, params)
SELECT fence.owner_user_id, fence.id, %(bucket)s, %(path)s, %(mime)s, %(width)s, %(height)s, %(bytes)s,
       %(prompt)s, %(backend)s, %(model)s, %(params)s
FROM fence
ON CONFLICT (job_id) DO UPDATE SET job_id = imagen.images.job_id
    WHERE imagen.images.owner_user_id = excluded.owner_user_id
RETURNING id
"""


# The chained path's end (sync and finalize run in the generation message): fence, images row and
# done in one statement. The fence locks the job row first, so a cancel waits for the commit, and
# the job is linked to the row written here or to the one an earlier run of this attempt wrote.
# 'syncing' is stamped on the server's clock, `sync_seconds` (the upload, timed by the worker) ago.
RECORD_AND_COMPLETE = """
WITH fence AS (
    SELECT id, owner_user_id FROM imagen.jobs
    WHERE id = %(job_id)s AND attempt = %(attempt)s AND status = 'running'
    FOR UPDATE
),
image AS (
    INSERT INTO imagen.images (owner_user_id, job_id, bucket, path, mime, width, height, bytes, prompt,
                               backend, model, params)
    SELECT fence.owner_user_id, fence.id, %(bucket)s, %(path)s, %(mime)s, %(width)s, %(height)s,
           %(bytes)s, %(prompt)s, %(backend)s, %(model)s, %(params)s
    FROM fence
    ON CONFLICT (job_id) DO UPDATE SET job_id = imagen.images.job_id
        WHERE imagen.images.owner_user_id = excluded.owner_user_id
    RETURNING id, job_id, owner_user_id
)
UPDATE imagen.jobs j
SET status = 'done', image_id = image.id, stage = NULL, error = NULL, last_error = NULL,
    stage_times = j.stage_times || jsonb_build_object(
        'syncing', now() - make_interval(secs => %(sync_seconds)s), 'done', now())
FROM image
WHERE j.id = image.job_id AND j.owner_user_id = image.owner_user_id
RETURNING image.id
"""


# The same with the provider call's usage row, written whether or not the fence holds (the call
# was made and paid either way): one commit for the job's end and its ledger row.
RECORD_USAGE_AND_COMPLETE = f"WITH usage AS ({usage_insert('u_')}),\n" + RECORD_AND_COMPLETE.replace(
    "WITH fence AS", "fence AS", 1
)


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
